"""Build a random-weight Qwen-Audio-Chat checkpoint of any size, on any device.

    python benchmarks/random_checkpoint.py OUT_DIR [--full-size] [--device cuda]
        [--family qwen-audio|qwen2-audio]

``--family qwen2-audio`` builds a Qwen2-Audio-7B-Instruct-shaped checkpoint instead
(random_qwen2_checkpoint.py).

``--full-size`` uses the published model's shapes (8.4 B parameters: 32 layers of 4096,
vocabulary 155947, a 32-layer 1280-wide audio encoder); built directly in bf16 on the GPU
it takes seconds, and about 17 GB of disk. Without it the tiny test shapes are used. The
vocabulary file is the tests' small learned BPE with the official special tokens, so the
audio tag ids are set to match it; the lm_head rows past the tokenizer are zero (never
sampled). Random weights give meaningless text but real speed.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))
sys.path.insert(0, str(TESTS_DIR.parent))

from tiny_model import learn_bpe_ranks, slaney_mel_filterbank, tiny_config  # noqa: E402

from oai_audio_server.models.qwen_audio.config import QwenAudioConfig  # noqa: E402
from oai_audio_server.models.qwen_audio.model import QwenAudioModel  # noqa: E402
from oai_audio_server.models.qwen_audio.tokenizer import special_token_names  # noqa: E402

# The published config.json's shapes (facts of the released checkpoint).
FULL_SIZE = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "kv_channels": 128, "intermediate_size": 22016, "vocab_size": 155947,
    "seq_length": 2048, "max_position_embeddings": 8192, "layer_norm_epsilon": 1e-5,
}
FULL_AUDIO = {"n_state": 1280, "n_head": 20, "n_layer": 32, "output_dim": 4096}


def build(
    out: Path, *, full_size: bool, device: torch.device, dtype: torch.dtype,
    weights: bool = True,
) -> Path:
    """``weights=False`` writes the config and tokenizer only (for --random-weights)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    ranks = learn_bpe_ranks()
    with open(out / "qwen.tiktoken", "w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    np.savez(out / "mel_filters.npz", mel_80=slaney_mel_filterbank())
    config = tiny_config(len(ranks))
    if full_size:
        config.update(FULL_SIZE)
        config["audio"].update(FULL_AUDIO)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    n_tok = len(ranks) + len(special_token_names())
    (out / "generation_config.json").write_text(json.dumps({
        "chat_format": "chatml", "eos_token_id": len(ranks), "pad_token_id": len(ranks),
        "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0,
        "top_p": 0.5,
    }, indent=2))
    if not weights:
        return out
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = QwenAudioModel(QwenAudioConfig.from_dict(config), max_len=16).to(dtype)
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("positional_embedding"):
                value = tensor
            elif tensor.ndim == 1 and ("ln" in name or "norm" in name):
                value = torch.ones_like(tensor) if name.endswith("weight") else tensor.zero_()
            else:
                value = tensor.normal_(0.0, 0.02)
            state[name] = value
        state["lm_head.weight"][n_tok:] = 0.0
    built = time.perf_counter() - started
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    params = sum(t.numel() for n, t in state.items() if not n.endswith("positional_embedding"))
    print(f"built {params / 1e6:,.1f} M parameters on {device} in {built:.1f} s, "
          f"saved in {time.perf_counter() - started - built:.1f} s to {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", choices=("qwen-audio", "qwen2-audio"), default="qwen-audio")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    build_family(args.family, args.out, full_size=args.full_size, device=device, dtype=dtype)


def build_family(
    family: str, out: Path, *, full_size: bool, device: torch.device, dtype: torch.dtype
) -> Path:
    if family == "qwen2-audio":
        from random_qwen2_checkpoint import build_qwen2

        return build_qwen2(out, full_size=full_size, device=device, dtype=dtype)
    return build(out, full_size=full_size, device=device, dtype=dtype)


if __name__ == "__main__":
    main()

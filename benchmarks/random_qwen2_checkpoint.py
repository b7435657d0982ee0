"""A random-weight Qwen2-Audio checkpoint of the published shapes (or the tiny test
shapes), built with this package's own model class on any device; no transformers.

Used by ``random_checkpoint.py --family qwen2-audio``. The tokenizer is the tests' small
BPE with Qwen2-Audio's special tokens, so ``audio_token_index`` is set to its
``<|AUDIO|>`` id; lm_head rows past the tokenizer are zero (never sampled).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))
sys.path.insert(0, str(TESTS_DIR.parent))

from qwen2_tiny import train_tokenizer  # noqa: E402

from oai_audio_server.models.qwen2_audio.config import Qwen2AudioConfig  # noqa: E402
from oai_audio_server.models.qwen2_audio.model import Qwen2AudioModel  # noqa: E402

# Qwen/Qwen2-Audio-7B-Instruct's config.json shapes (facts of the released checkpoint).
FULL_TEXT = {
    "vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
}
FULL_AUDIO = {
    "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120, "max_source_positions": 1500,
}
TINY_TEXT = {
    "vocab_size": 640, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
}
TINY_AUDIO = {
    "num_mel_bins": 128, "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 4,
    "encoder_ffn_dim": 64, "max_source_positions": 1500,
}


def checkpoint_config(full_size: bool, audio_token: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2AudioForConditionalGeneration"],
        "model_type": "qwen2_audio",
        "audio_token_index": audio_token,
        "audio_config": {"model_type": "qwen2_audio_encoder", "activation_function": "gelu",
                         **(FULL_AUDIO if full_size else TINY_AUDIO)},
        "text_config": {"model_type": "qwen2", "hidden_act": "silu",
                        "tie_word_embeddings": False, **(FULL_TEXT if full_size else TINY_TEXT)},
    }


def build_qwen2(out: Path, *, full_size: bool, device: torch.device, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
    eod, im_end = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")
    config = checkpoint_config(full_size, tokenizer.token_to_id("<|AUDIO|>"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": eod, "eos_token_id": [eod, im_end], "pad_token_id": eod,
        "do_sample": False, "max_new_tokens": 512,
    }, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
        "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "chunk_length": 30,
        "return_attention_mask": True, "processor_class": "Qwen2AudioProcessor",
    }, indent=2))
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2AudioModel(Qwen2AudioConfig.from_dict(config), max_len=16).to(dtype)
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.ndim == 1 and ("norm" in name or "layer_norm" in name):
                value = torch.ones_like(tensor) if name.endswith("weight") else tensor.zero_()
            else:
                value = tensor.normal_(0.0, 0.02)
            state[name] = value
        state["language_model.lm_head.weight"][n_tok:] = 0.0
    built = time.perf_counter() - started
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    params = sum(t.numel() for t in state.values())
    print(f"built {params / 1e9:.2f} B parameters on {device} in {built:.1f} s, "
          f"saved in {time.perf_counter() - started - built:.1f} s to {out}")
    return out

"""The official side of the opt-in equivalence tests, run in its own interpreter.

The published Qwen-Audio remote code needs transformers 4.32-4.53, which this package
no longer depends on, so the tests run this script with ``OAS_QWEN_AUDIO_PYTHON`` (an
interpreter that has such a transformers; default: the test interpreter) as a child
process, and compare what it prints with the native engine.

    python official_side.py build REPO TARGET      build the tiny official checkpoint
    python official_side.py chat CKPT JOBS.json    model.chat per job, JSON on stdout

A job is {"system", "history": [[query, answer], ...], "query", "max_new_tokens"}, the
query strings in the official list format (audio file paths inside <audio> tags). The
answer per job: the response, the prompt ids handed to generate(), the audio info, and
the float32 logits of the prompt's last position from one forward pass.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REMOTE_FILES = (
    "audio.py", "configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py",
    "tokenization_qwen.py", "qwen.tiktoken", "mel_filters.npz", "tokenizer_config.json",
)
# Small enough to build in seconds on a CPU, same architecture as the real model.
TINY_SIZES = {
    "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "num_hidden_layers": 2,
    "intermediate_size": 128, "seq_length": 2048, "fp32": True, "bf16": False,
    "fp16": False, "use_flash_attn": False,
}
TINY_AUDIO = {"n_state": 64, "n_head": 4, "n_layer": 2, "output_dim": 64}


def build(repo: Path, target: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in REMOTE_FILES if not (repo / name).is_file()]
    if missing:
        raise SystemExit(f"{repo} is not a Qwen-Audio checkout: missing {missing}")
    target.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_FILES:
        shutil.copy(repo / name, target / name)
    # modeling_qwen.py imports .cpp_kernels (only used with use_cache_kernel), which the
    # repository does not ship; transformers refuses remote code with missing imports.
    (target / "cpp_kernels.py").write_text("cache_autogptq_cuda_256 = None\n")
    config = json.loads((repo / "config.json").read_text())
    config.update(TINY_SIZES)
    config["audio"] = {**config["audio"], **TINY_AUDIO}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model_config = AutoConfig.from_pretrained(str(target), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(target), trust_remote_code=True)
    with torch.no_grad():
        # Larger random weights than the default init, so that answers depend on the
        # input; rows past the tokenizer would be sampled and fail to decode: zero.
        for name, param in model.named_parameters():
            if param.ndim == 2 and "wte" not in name:
                param.normal_(0.0, 0.3)
        model.lm_head.weight[len(tokenizer):] = 0
    model.save_pretrained(str(target), safe_serialization=True)
    # After save_pretrained, which writes a bare generation config of its own.
    shutil.copy(repo / "chat_generation_config.json", target / "generation_config.json")
    saved = json.loads((target / "config.json").read_text())
    if "auto_map" not in saved:
        saved["auto_map"] = config["auto_map"]
        (target / "config.json").write_text(json.dumps(saved, indent=2))


def chat(checkpoint: Path, jobs_file: Path) -> None:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with contextlib.redirect_stdout(sys.stderr):  # the remote code prints while loading
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint), trust_remote_code=True, fp32=True
        ).eval()
    seen: dict = {}
    original = model.generate

    def recording_generate(input_ids, *args, **kwargs):
        seen["ids"] = input_ids[0].tolist()
        seen["audio_info"] = kwargs.get("audio_info")
        return original(input_ids, *args, **kwargs)

    model.generate = recording_generate
    results = []
    for job in json.loads(jobs_file.read_text()):
        with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
            response, _ = model.chat(
                tokenizer, job["query"], history=[tuple(t) for t in job["history"]],
                system=job["system"], do_sample=False, max_new_tokens=job["max_new_tokens"],
            )
            info = seen["audio_info"]
            ids = torch.tensor([seen["ids"]])
            out = model(ids, audio_info=info) if info else model(ids)
        results.append({
            "response": response,
            "input_ids": seen["ids"],
            "last_logits": out.logits[0, -1].float().tolist(),
            "audio_span_tokens": list(info["audio_span_tokens"]) if info else [],
            "input_audio_lengths": info["input_audio_lengths"].tolist() if info else [],
            "input_audios": info["input_audios"].float().tolist() if info else [],
        })
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    command, first, second = sys.argv[1:4]
    if command == "build":
        build(Path(first), Path(second))
    else:
        chat(Path(first), Path(second))

"""Build a tiny random-weight checkpoint from a checkout of the official QwenLM/Qwen-Audio
repository, at test time and outside this repository (opt-in: OAS_QWEN_AUDIO_REPO).

Nothing of the official code is part of this project: the files are copied from the
checkout the variable names into a temporary directory, exactly as a user's downloaded
checkpoint holds them, and loaded through transformers' trust_remote_code path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REPO_ENV = "OAS_QWEN_AUDIO_REPO"

_REMOTE_FILES = (
    "audio.py",
    "configuration_qwen.py",
    "modeling_qwen.py",
    "qwen_generation_utils.py",
    "tokenization_qwen.py",
    "qwen.tiktoken",
    "mel_filters.npz",
    "tokenizer_config.json",
)

# Small enough to build in seconds on a CPU, same architecture as the real model.
_TINY_SIZES = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "seq_length": 2048,
    "fp32": True,
    "bf16": False,
    "fp16": False,
    "use_flash_attn": False,
}
_TINY_AUDIO = {"n_state": 64, "n_head": 4, "n_layer": 2, "output_dim": 64}


def official_repo() -> Path | None:
    value = os.environ.get(REPO_ENV)
    return Path(value) if value else None


def build_official_checkpoint(repo: Path, target: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in _REMOTE_FILES if not (repo / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{repo} is not a Qwen-Audio checkout: missing {missing}")
    target.mkdir(parents=True, exist_ok=True)
    for name in _REMOTE_FILES:
        shutil.copy(repo / name, target / name)
    # modeling_qwen.py imports .cpp_kernels (only used with use_cache_kernel), which the
    # repository does not ship; transformers refuses remote code with missing imports.
    (target / "cpp_kernels.py").write_text("cache_autogptq_cuda_256 = None\n")

    config = json.loads((repo / "config.json").read_text())
    config.update(_TINY_SIZES)
    config["audio"] = {**config["audio"], **_TINY_AUDIO}
    (target / "config.json").write_text(json.dumps(config, indent=2))

    torch.manual_seed(seed)
    model_config = AutoConfig.from_pretrained(str(target), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(target), trust_remote_code=True)
    with torch.no_grad():
        # Random rows past the tokenizer's vocabulary would be sampled and then fail to
        # decode; a real checkpoint never produces them.
        model.lm_head.weight[len(tokenizer) :] = 0
    model.save_pretrained(str(target))
    # After save_pretrained, which writes a bare generation config of its own.
    shutil.copy(repo / "chat_generation_config.json", target / "generation_config.json")
    saved = json.loads((target / "config.json").read_text())
    if "auto_map" not in saved:
        saved["auto_map"] = config["auto_map"]
        (target / "config.json").write_text(json.dumps(saved, indent=2))
    return target

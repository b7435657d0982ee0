"""Finding, loading and describing the checkpoint.

The model is loaded through transformers' ``trust_remote_code`` path, exactly as the
official README does, so any Qwen-Audio-Chat checkpoint (or fine-tune) works unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oai_audio_server.audio.features import MelFeatureExtractor
from oai_audio_server.errors import ContextLengthExceededError
from oai_audio_server.settings import Settings

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_dir(model: str, download_dir: str | None = None, hub: str = "auto") -> Path:
    """A local directory as is; anything else is a model id to download (``hub.py``)."""
    from oai_audio_server.hub import resolve

    return resolve(model, hub, download_dir)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {setting} asked for CUDA, but no CUDA device is available")
    return device


def cpu_thread_count(setting: int, cores: int | None = None) -> int:
    """Compute threads for CPU inference. Giving PyTorch every core leaves none for the
    event loop and audio decoding, and its threads then wait on each other whenever one
    is preempted. On a 2-core machine a 128-token answer took 0.12 s through the server
    with one thread and 0.15-0.18 s with two, and far longer under load, so one core
    is kept free."""
    if setting > 0:
        return setting
    return max(1, (cores if cores is not None else os.cpu_count() or 1) - 1)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults from the checkpoint's generation config, used when a request is silent."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int


@dataclass
class ModelBundle:
    model: Any
    tokenizer: Any
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    token_bytes: list[bytes]
    stop_token_ids: frozenset[int]
    pad_token_id: int
    max_window_size: int
    max_model_len: int
    # Longest sequence that keeps batched greedy equal to solo greedy (rotary scaling
    # switches on past the model's seq_length); None means no such limit.
    exact_batch_len: int | None
    defaults: SamplingDefaults
    mel: MelFeatureExtractor

    @property
    def vocab_limit(self) -> int:
        return len(self.token_bytes)


@dataclass(frozen=True)
class ModelInfo:
    """The part of a ModelBundle that a process without the model needs (picklable)."""

    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    stop_token_ids: frozenset[int]
    pad_token_id: int
    max_window_size: int
    max_model_len: int
    exact_batch_len: int | None
    defaults: SamplingDefaults

    @classmethod
    def of(cls, bundle: ModelBundle) -> ModelInfo:
        return cls(**{f.name: getattr(bundle, f.name) for f in dataclasses.fields(cls)})


def load_front_bundle(info: ModelInfo) -> ModelBundle:
    """The tokenizer and audio features without the weights: for the HTTP process when
    the model runs in an engine process (``model`` is None)."""
    from transformers import AutoTokenizer

    with contextlib.redirect_stdout(_PrintsToLog()):
        tokenizer = AutoTokenizer.from_pretrained(str(info.model_dir), trust_remote_code=True)
    return ModelBundle(
        model=None,
        tokenizer=tokenizer,
        token_bytes=_token_bytes(tokenizer),
        mel=MelFeatureExtractor.from_checkpoint(info.model_dir),
        **{f.name: getattr(info, f.name) for f in dataclasses.fields(info)},
    )


def room_after_prompt(bundle: ModelBundle, prompt_len: int, *, param: str, fix: str) -> int:
    """Tokens left for the answer, or a 400 when the prompt does not fit the window."""
    room = bundle.max_model_len - prompt_len
    if prompt_len > bundle.max_window_size or room < 1:
        raise ContextLengthExceededError(
            f"the prompt is {prompt_len} tokens (audio included), more than the model's "
            f"{min(bundle.max_window_size, bundle.max_model_len - 1)}-token window; {fix}",
            param=param,
        )
    return room


def _token_bytes(tokenizer: Any) -> list[bytes]:
    """Bytes of every decodable id: ordinary tokens are bytes, special tokens their text."""
    table: list[bytes] = []
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        table.append(token if isinstance(token, bytes) else str(token).encode("utf-8"))
    return table


def _sampling_defaults(generation_config: Any) -> SamplingDefaults:
    def get(name: str, default: Any) -> Any:
        value = getattr(generation_config, name, None)
        return default if value is None else value

    return SamplingDefaults(
        do_sample=bool(get("do_sample", False)),
        temperature=float(get("temperature", 1.0)),
        top_p=float(get("top_p", 1.0)),
        top_k=int(get("top_k", 0)),
        repetition_penalty=float(get("repetition_penalty", 1.0)),
        max_new_tokens=int(get("max_new_tokens", 512)),
    )


class _PrintsToLog(io.TextIOBase):
    """The official remote code print()s while loading; as log records those lines keep
    JSON-lines logs (--log-json) parseable."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                logger.info("remote code: %s", line.strip())
        return len(text)


def load_bundle(settings: Settings) -> ModelBundle:
    with contextlib.redirect_stdout(_PrintsToLog()):
        return _load_bundle(settings)


def _load_bundle(settings: Settings) -> ModelBundle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(settings.model, settings.download_dir, settings.hub)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_thread_count(settings.cpu_threads))
    logger.info("loading %s on %s as %s", model_dir, device, dtype)

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        trust_remote_code=True,
        torch_dtype=dtype,
        # The remote code picks its own precision from these flags unless told.
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp32=dtype == torch.float32,
        device_map={"": str(device)} if device.type == "cuda" else None,
    )
    if device.type != "cuda":
        model = model.to(device)
    model.eval()

    generation_config = model.generation_config
    eos = getattr(generation_config, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    stop_ids = frozenset([tokenizer.im_end_id, tokenizer.im_start_id, *eos_ids])
    pad = getattr(generation_config, "pad_token_id", None)
    max_window = int(getattr(generation_config, "max_window_size", 6144))
    config = model.config
    max_model_len = int(getattr(config, "max_position_embeddings", 0) or max_window + 2048)
    seq_length = getattr(config, "seq_length", None)
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        token_bytes=_token_bytes(tokenizer),
        stop_token_ids=stop_ids,
        pad_token_id=int(pad if pad is not None else tokenizer.eod_id),
        max_window_size=max_window,
        max_model_len=max(max_model_len, max_window),
        exact_batch_len=int(seq_length) if seq_length else None,
        defaults=_sampling_defaults(generation_config),
        mel=MelFeatureExtractor.from_checkpoint(model_dir),
    )

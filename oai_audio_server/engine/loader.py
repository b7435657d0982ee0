"""Finding, loading and describing the checkpoint.

The model runs in this package's own code (``oai_audio_server.models``) on the
checkpoint's weight files, tokenizer vocabulary and audio front end; no remote code is
imported or run. The family (Qwen-Audio or Qwen2-Audio) comes from config.json
(``models/registry.py``), so any checkpoint or fine-tune with a published layout works.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oai_audio_server.audio.features import MelFeatureExtractor
from oai_audio_server.errors import ContextLengthExceededError
from oai_audio_server.models.base import EngineModel
from oai_audio_server.models.checkpoint import read_config
from oai_audio_server.models.registry import (
    FamilyTokenizer,
    PromptBuilder,
    detect_family,
    family_named,
)
from oai_audio_server.settings import Settings

if TYPE_CHECKING:
    from oai_audio_server.engine.grammar import GrammarCache

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_dir(model: str, download_dir: str | None = None, hub: str = "auto") -> Path:
    """A local directory as is; anything else is a model id to download (``hub.py``)."""
    from oai_audio_server.hub import resolve

    return resolve(model, hub, download_dir)


_DEVICE_HELP = "use --device cpu, auto (a GPU when there is one), cuda or cuda:N"


def pick_device(setting: str) -> torch.device:
    """``--device`` as a device with an explicit index: ``cuda`` becomes ``cuda:<the
    current device>``, because ``torch.cuda.set_device`` (the engine thread's first CUDA
    call) refuses a device without one. Raises ValueError with one line saying what to
    pass instead."""
    text = setting.strip().lower()
    if text == "auto":
        return torch.device(f"cuda:{_current_cuda()}" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    kind, colon, index = text.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ValueError(f"--device {setting!r} is not a device this server runs on; "
                         f"{_DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {setting} asked for CUDA, but no CUDA device is "
                         "available (the CPU build of PyTorch, or no GPU visible); use "
                         "--device cpu or auto")
    count = torch.cuda.device_count()
    number = int(index) if index else _current_cuda()
    if number >= count:
        raise ValueError(f"--device {setting}: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}; use one of those, or --device auto")
    return torch.device(f"cuda:{number}")


def _current_cuda() -> int:
    """The current CUDA device without starting CUDA in this process (the start-up checks
    run in the HTTP process, which must hold no CUDA context): 0 until something sets it."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


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
    model: EngineModel | None  # None in a process that only prepares requests
    tokenizer: FamilyTokenizer
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    token_bytes: list[bytes]
    stop_token_ids: frozenset[int]
    pad_token_id: int
    max_window_size: int
    max_model_len: int
    defaults: SamplingDefaults
    mel: MelFeatureExtractor
    family: str = "qwen-audio"  # models/registry.py

    @property
    def vocab_limit(self) -> int:
        return len(self.token_bytes)

    @functools.cached_property
    def grammars(self) -> GrammarCache:
        """Structured-output grammars compiled for this vocabulary (built on first use)."""
        from oai_audio_server.engine.grammar import GrammarCache

        # Both families' tokenizers name their control and audio tokens here.
        special: dict[str, int] = getattr(self.tokenizer, "special_tokens", {})
        return GrammarCache(self.token_bytes, special.values(), self.stop_token_ids)

    def prompt_builder(self) -> PromptBuilder:
        """The family's prompt builder for this checkpoint (the token table it bounds
        text with is the bundle's own, not built again)."""
        from oai_audio_server.qwen.prompt import longest_token_bytes

        family = family_named(self.family)
        return family.prompt_builder(
            self.tokenizer, self.model_dir, self.max_window_size,
            longest_token_bytes(self.token_bytes),
        )


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
    defaults: SamplingDefaults
    family: str = "qwen-audio"

    @classmethod
    def of(cls, bundle: ModelBundle) -> ModelInfo:
        return cls(**{f.name: getattr(bundle, f.name) for f in dataclasses.fields(cls)})


def load_front_bundle(info: ModelInfo) -> ModelBundle:
    """The tokenizer and audio features without the weights: for the HTTP process when
    the model runs in an engine process (``model`` is None)."""
    family = family_named(info.family)
    tokenizer = family.tokenizer(info.model_dir)
    return ModelBundle(
        model=None,
        tokenizer=tokenizer,
        token_bytes=tokenizer.token_bytes(),
        mel=family.mel(info.model_dir),
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


def _sampling_defaults(generation_config: dict[str, Any]) -> SamplingDefaults:
    def get(name: str, default: Any) -> Any:
        value = generation_config.get(name)
        return default if value is None else value

    return SamplingDefaults(
        do_sample=bool(get("do_sample", False)),
        temperature=float(get("temperature", 1.0)),
        top_p=float(get("top_p", 1.0)),
        top_k=int(get("top_k", 0)),
        repetition_penalty=float(get("repetition_penalty", 1.0)),
        max_new_tokens=int(get("max_new_tokens", 512)),
    )


def _read_generation_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def load_bundle(settings: Settings) -> ModelBundle:
    model_dir = resolve_model_dir(settings.model, settings.download_dir, settings.hub)
    raw_config = read_config(model_dir)
    family = detect_family(raw_config)
    tokenizer = family.tokenizer(model_dir)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_thread_count(settings.cpu_threads))
    generation_config = _read_generation_config(model_dir)
    positions = family.max_position_embeddings(raw_config)
    max_window = int(generation_config.get("max_window_size") or 0) or (
        family.default_window or positions
    )
    max_model_len = settings.max_model_len or max(positions, max_window)
    logger.info("loading %s (%s) on %s as %s", model_dir, family.title, device, dtype)
    model = family.load_model(
        model_dir, raw_config, max_model_len, device, dtype, settings.random_weights
    )

    eos = generation_config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    stop_ids = frozenset([tokenizer.im_end_id, tokenizer.im_start_id, *eos_ids])
    pad = generation_config.get("pad_token_id")
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        token_bytes=tokenizer.token_bytes(),
        stop_token_ids=stop_ids,
        pad_token_id=int(pad if pad is not None else tokenizer.eod_id),
        max_window_size=max_window,
        max_model_len=max_model_len,
        defaults=_sampling_defaults(generation_config),
        mel=family.mel(model_dir),
        family=family.name,
    )

"""Which model family a checkpoint is, from its config.json alone (never its name), and
what each family contributes: tokenizer, audio features, prompt builder and model.

Every family runs on the same engine through :class:`~oai_audio_server.models.base.EngineModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from oai_audio_server.audio.features import MelFeatureExtractor
from oai_audio_server.models.base import EngineModel
from oai_audio_server.models.checkpoint import UnsupportedCheckpointError, describe
from oai_audio_server.qwen.conversation import Conversation
from oai_audio_server.qwen.prompt import Prompt


class FamilyTokenizer(Protocol):
    """What the server needs of any family's tokenizer."""

    eod_id: int
    im_start_id: int
    im_end_id: int

    def encode_text(self, text: str) -> list[int]: ...

    def token_bytes(self) -> list[bytes]: ...


class PromptBuilder(Protocol):
    # The most UTF-8 bytes one token stands for (0 = unknown): the HTTP layer refuses
    # text that cannot fit the window with it, before any tokenising.
    max_token_bytes: int

    def build(self, conversation: Conversation) -> Prompt: ...


@dataclass(frozen=True)
class ModelFamily:
    name: str  # stable id, kept in ModelInfo
    title: str  # for logs and docs
    matches: Callable[[dict[str, Any]], bool]
    max_position_embeddings: Callable[[dict[str, Any]], int]
    # Longest prompt when generation_config.json has no max_window_size; 0: the model length.
    default_window: int
    tokenizer: Callable[[Path], FamilyTokenizer]
    mel: Callable[[Path], MelFeatureExtractor]
    # (tokenizer, checkpoint directory, window, most bytes one token stands for)
    prompt_builder: Callable[[Any, Path, int, int], PromptBuilder]
    # (dir, config, max_len, device, dtype, random_weights) -> model
    load_model: Callable[[Path, dict[str, Any], int, torch.device, torch.dtype, bool], EngineModel]


def _qwen_audio() -> ModelFamily:
    from oai_audio_server.models.qwen_audio.config import QwenAudioConfig, is_qwen_audio
    from oai_audio_server.models.qwen_audio.model import QwenAudioModel
    from oai_audio_server.models.qwen_audio.tokenizer import QwenAudioTokenizer
    from oai_audio_server.qwen.prompt import QwenPromptBuilder

    def load(
        model_dir: Path, raw: dict[str, Any], max_len: int, device: torch.device,
        dtype: torch.dtype, random_weights: bool,
    ) -> EngineModel:
        config = QwenAudioConfig.from_dict(raw)
        return QwenAudioModel.load(model_dir, config, max_len=max_len, device=device, dtype=dtype,
                                   random_weights=random_weights)

    return ModelFamily(
        name="qwen-audio",
        title="Qwen-Audio(-Chat)",
        matches=is_qwen_audio,
        max_position_embeddings=lambda raw: QwenAudioConfig.from_dict(raw).max_position_embeddings,
        default_window=6144,
        tokenizer=QwenAudioTokenizer.from_dir,
        mel=MelFeatureExtractor.from_checkpoint,
        prompt_builder=lambda tok, _dir, window, token_bytes: QwenPromptBuilder(
            tok, max_window_size=window, max_token_bytes=token_bytes
        ),
        load_model=load,
    )


def _qwen2_audio() -> ModelFamily:
    from oai_audio_server.models.qwen2_audio.config import Qwen2AudioConfig, is_qwen2_audio
    from oai_audio_server.models.qwen2_audio.features import qwen2_mel_extractor
    from oai_audio_server.models.qwen2_audio.model import Qwen2AudioModel
    from oai_audio_server.models.qwen2_audio.prompt import Qwen2PromptBuilder
    from oai_audio_server.models.qwen2_audio.tokenizer import Qwen2AudioTokenizer

    def load(
        model_dir: Path, raw: dict[str, Any], max_len: int, device: torch.device,
        dtype: torch.dtype, random_weights: bool,
    ) -> EngineModel:
        config = Qwen2AudioConfig.from_dict(raw)
        return Qwen2AudioModel.load(model_dir, config, max_len=max_len, device=device,
                                    dtype=dtype, random_weights=random_weights)

    return ModelFamily(
        name="qwen2-audio",
        title="Qwen2-Audio",
        matches=is_qwen2_audio,
        max_position_embeddings=lambda raw: Qwen2AudioConfig.from_dict(
            raw
        ).text.max_position_embeddings,
        default_window=0,  # no window of its own: the model length is the limit
        tokenizer=Qwen2AudioTokenizer.from_dir,
        mel=qwen2_mel_extractor,
        prompt_builder=lambda tok, model_dir, _window, token_bytes: Qwen2PromptBuilder.from_dir(
            tok, model_dir, max_token_bytes=token_bytes
        ),
        load_model=load,
    )


FAMILIES: tuple[Callable[[], ModelFamily], ...] = (_qwen_audio, _qwen2_audio)


def family_named(name: str) -> ModelFamily:
    for make in FAMILIES:
        family = make()
        if family.name == name:
            return family
    raise KeyError(f"no model family {name!r}")


def detect_family(raw: dict[str, Any]) -> ModelFamily:
    for make in FAMILIES:
        family = make()
        if family.matches(raw):
            return family
    raise UnsupportedCheckpointError(
        f"not a supported checkpoint: its config.json has {describe(raw)}; this server runs "
        "QWenLMHeadModel with an 'audio' encoder section (Qwen-Audio, Qwen-Audio-Chat) and "
        "Qwen2AudioForConditionalGeneration (Qwen2-Audio, Qwen2-Audio-Instruct)"
    )

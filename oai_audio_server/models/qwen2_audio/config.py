"""The fields of a Qwen2-Audio ``config.json`` that the model code uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oai_audio_server.models.checkpoint import UnsupportedCheckpointError, describe

ARCHITECTURE = "Qwen2AudioForConditionalGeneration"


def is_qwen2_audio(raw: dict[str, Any]) -> bool:
    return ARCHITECTURE in (raw.get("architectures") or []) or raw.get("model_type") == (
        "qwen2_audio"
    )


@dataclass(frozen=True)
class Qwen2AudioEncoderConfig:
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    max_source_positions: int
    activation_function: str


@dataclass(frozen=True)
class Qwen2TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen2AudioConfig:
    text: Qwen2TextConfig
    audio: Qwen2AudioEncoderConfig
    audio_token_id: int

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen2AudioConfig:
        if not is_qwen2_audio(raw):
            raise UnsupportedCheckpointError(
                f"not a Qwen2-Audio checkpoint: its config.json has {describe(raw)}; this "
                f"family runs {ARCHITECTURE}"
            )
        text = raw.get("text_config") or {}
        audio = raw.get("audio_config") or {}
        hidden = int(text.get("hidden_size", 4096))
        heads = int(text.get("num_attention_heads", 32))
        if hidden % heads:
            raise UnsupportedCheckpointError(
                "hidden_size must be a multiple of num_attention_heads"
            )
        if text.get("rope_scaling"):
            raise UnsupportedCheckpointError(
                "this server runs Qwen2-Audio without rope_scaling; the checkpoint sets "
                f"{text['rope_scaling']!r}"
            )
        return cls(
            text=Qwen2TextConfig(
                vocab_size=int(text.get("vocab_size", 156032)),
                hidden_size=hidden,
                num_hidden_layers=int(text.get("num_hidden_layers", 32)),
                num_attention_heads=heads,
                num_key_value_heads=int(text.get("num_key_value_heads", heads)),
                intermediate_size=int(text.get("intermediate_size", 11008)),
                rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                rope_theta=float(text.get("rope_theta", 10000.0)),
                max_position_embeddings=int(text.get("max_position_embeddings", 8192)),
                tie_word_embeddings=bool(
                    text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))
                ),
                hidden_act=str(text.get("hidden_act", "silu")),
            ),
            audio=Qwen2AudioEncoderConfig(
                num_mel_bins=int(audio.get("num_mel_bins", 128)),
                d_model=int(audio.get("d_model", 1280)),
                encoder_layers=int(audio.get("encoder_layers", 32)),
                encoder_attention_heads=int(audio.get("encoder_attention_heads", 20)),
                encoder_ffn_dim=int(audio.get("encoder_ffn_dim", 5120)),
                max_source_positions=int(audio.get("max_source_positions", 1500)),
                activation_function=str(audio.get("activation_function", "gelu")),
            ),
            audio_token_id=int(raw.get("audio_token_index", raw.get("audio_token_id", 151646))),
        )

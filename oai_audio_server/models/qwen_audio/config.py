"""The fields of a Qwen-Audio(-Chat) ``config.json`` that the model code uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oai_audio_server.models.checkpoint import UnsupportedCheckpointError, describe

ARCHITECTURE = "QWenLMHeadModel"


@dataclass(frozen=True)
class AudioEncoderConfig:
    n_mels: int
    n_ctx: int
    n_state: int
    n_head: int
    n_layer: int
    output_dim: int
    avg_pool: bool
    add_audio_bos_eos_token: bool
    audio_start_id: int


@dataclass(frozen=True)
class QwenAudioConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_channels: int
    intermediate_size: int
    layer_norm_epsilon: float
    rotary_emb_base: float
    rotary_pct: float
    seq_length: int
    max_position_embeddings: int
    use_dynamic_ntk: bool
    use_logn_attn: bool
    scale_attn_weights: bool
    no_bias: bool
    audio: AudioEncoderConfig

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QwenAudioConfig:
        if not is_qwen_audio(raw):
            raise UnsupportedCheckpointError(
                f"not a Qwen-Audio checkpoint: its config.json has {describe(raw)}; this "
                f"server runs {ARCHITECTURE} with an 'audio' encoder section "
                "(Qwen-Audio, Qwen-Audio-Chat)"
            )
        audio = raw["audio"]
        if int(raw["num_attention_heads"]) * int(raw["kv_channels"]) != int(raw["hidden_size"]):
            raise UnsupportedCheckpointError(
                "num_attention_heads x kv_channels must equal hidden_size in a QWen config"
            )
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            kv_channels=int(raw["kv_channels"]),
            intermediate_size=int(raw["intermediate_size"]),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-6)),
            rotary_emb_base=float(raw.get("rotary_emb_base", 10000)),
            rotary_pct=float(raw.get("rotary_pct", 1.0)),
            seq_length=int(raw.get("seq_length", 2048)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
            use_dynamic_ntk=bool(raw.get("use_dynamic_ntk", True)),
            use_logn_attn=bool(raw.get("use_logn_attn", True)),
            scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
            no_bias=bool(raw.get("no_bias", True)),
            audio=AudioEncoderConfig(
                n_mels=int(audio["n_mels"]),
                n_ctx=int(audio["n_ctx"]),
                n_state=int(audio["n_state"]),
                n_head=int(audio["n_head"]),
                n_layer=int(audio["n_layer"]),
                output_dim=int(audio["output_dim"]),
                avg_pool=bool(audio.get("avg_pool", True)),
                add_audio_bos_eos_token=bool(audio.get("add_audio_bos_eos_token", True)),
                audio_start_id=int(audio["audio_start_id"]),
            ),
        )


def is_qwen_audio(raw: dict[str, Any]) -> bool:
    architectures = raw.get("architectures") or []
    named = ARCHITECTURE in architectures or raw.get("model_type") == "qwen"
    return bool(named and isinstance(raw.get("audio"), dict))

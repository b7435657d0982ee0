"""Build a tiny random-weight Qwen2-Audio checkpoint with transformers' own classes.

The weights come from ``Qwen2AudioForConditionalGeneration`` (the reference
implementation) with a fixed seed, saved with ``save_pretrained``; the tokenizer is a
small byte-level BPE (``tokenizers``) with Qwen2's pre-tokeniser and the model's special
tokens; ``preprocessor_config.json`` is a 128-bin WhisperFeatureExtractor's. Like the
published checkpoint, there is no processor chat template file, so the processor uses
its built-in template (and the server its equivalent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Qwen2's pre-tokenisation regex (a fact of its vocabulary).
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
    "<|audio_eos|>",
)
CORPUS = (
    "You are a helpful assistant. system user assistant Audio 1: Audio 2: Audio 3:\n"
    "What is said in the audio? What does the speaker say? Transcribe the audio.\n"
    "Translate what the person says into English. Reply with an exact transcript.\n"
    "The quick brown fox jumps over the lazy dog. Hello, how are you today?\n"
) * 4


def train_tokenizer() -> Any:
    """A small byte-level BPE ``tokenizers.Tokenizer`` with Qwen2's pre-tokeniser and the
    model's special tokens (no transformers needed)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    tok.add_special_tokens(list(SPECIALS))
    return tok


def build_tokenizer(target: Path) -> Any:
    """tokenizer.json + tokenizer_config.json in ``target``; returns the HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIALS[3:]),
    )
    hf.save_pretrained(str(target))
    return hf


def build_qwen2_checkpoint(target: Path, *, seed: int = 0, kv_heads: int = 2) -> Path:
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    target.mkdir(parents=True, exist_ok=True)
    hf_tok = build_tokenizer(target)
    vocab = len(hf_tok)
    config = Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "d_model": 32,
            "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 64,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2", "vocab_size": vocab + 8, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": kv_heads, "max_position_embeddings": 2048,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "bos_token_id": hf_tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": hf_tok.convert_tokens_to_ids("<|im_end|>"),
        },
        audio_token_index=hf_tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config.text_config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.save_pretrained(str(target), safe_serialization=True)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(target))
    eod, im_end = (hf_tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    (target / "generation_config.json").write_text(json.dumps({
        "bos_token_id": eod, "eos_token_id": [eod, im_end], "pad_token_id": eod,
        "do_sample": False, "max_new_tokens": 64,
    }))
    return target


def load_reference(model_dir: Path) -> tuple[Any, Any]:
    """(transformers model in float32 eager attention, processor) for ``model_dir``."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    model = Qwen2AudioForConditionalGeneration.from_pretrained(
        str(model_dir), torch_dtype="float32", attn_implementation="eager"
    ).eval()
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor.from_pretrained(str(model_dir)),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(str(model_dir)),
    )
    return model, processor

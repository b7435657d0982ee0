"""Build a tiny random-weight stand-in for the Qwen-Audio-Chat checkpoint.

Tests must never need the real 20 GB checkpoint. `build_tiny_checkpoint` writes a
directory that loads through exactly the same path as the real one
(`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`)
and runs the "remote code" in `tests/tiny_qwen_remote/`, which follows the public
interface of the published model code (written for this project, not copied).
"""

from __future__ import annotations

import base64
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "tiny_qwen_remote"

# Same pre-tokenisation regex as the tokenizer, so the learned merges are usable.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Text the BPE merges are learned from: the words that show up in chat prompts, so
# that prompts in tests are a realistic number of tokens rather than one per byte.
_MERGE_CORPUS = (
    """
You are a helpful assistant. system user assistant Audio 1: Audio 2: Audio 3:
What is said in the audio? What does the speaker say? Transcribe the audio.
Please describe the sound. What is the emotion of the speaker? What can you hear?
The quick brown fox jumps over the lazy dog. This is a test of the server, and
the answer should be short. Translate the speech into English. Summarize what the
speaker is talking about in one sentence. Is there music in the background?
Hello, how are you today? I am fine, thank you. What time is it? Where are we?
Which language is spoken in this recording? The recording contains speech from
a man and a woman talking about the weather and the news of the day.
transcription translation caption sound music speech noise silence speaker voice
"""
    * 3
)

N_MERGES = 400


def learn_bpe_ranks(corpus: str = _MERGE_CORPUS, n_merges: int = N_MERGES) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes (rank = byte value), then learned merges.

    Every merged token is the concatenation of two lower-ranked tokens, which is
    what tiktoken needs to be able to produce it. Ties are broken by the byte
    strings, so the result depends on nothing but the corpus.
    """
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(
        tuple(bytes([c]) for c in w.encode("utf-8")) for w in regex.findall(PAT_STR, corpus)
    )
    for _ in range(n_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], [-x for x in kv[0][0] + kv[0][1]]))[0]
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        new_words: Counter[tuple[bytes, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return ranks


def slaney_mel_filterbank(
    sr: int = 16000,
    n_fft: int = 400,
    n_mels: int = 80,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Triangular mel filters [n_mels, n_fft // 2 + 1], Slaney mel scale and area norm.

    The Slaney scale is linear (200/3 Hz per mel) below 1 kHz and logarithmic
    above; each triangle is scaled by 2 / its width so all filters have equal area.
    """
    fmax = sr / 2 if fmax is None else fmax
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(
            f >= min_log_hz,
            min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep,
            f / f_sp,
        )

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        return np.where(
            m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), m * f_sp
        )

    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_points = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(mel_points)
    offsets = mel_points[:, None] - fft_freqs[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return weights.astype(np.float32)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_checkpoint(target: Path, *, seed: int = 0) -> Path:
    """Write a complete tiny Qwen-Audio-Chat-like checkpoint into `target`.

    Deterministic for a given seed; a few MB; takes a few seconds.
    Returns `target`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)

    for src in sorted(REMOTE_CODE_DIR.glob("*.py")):
        shutil.copyfile(src, target / src.name)

    ranks = learn_bpe_ranks()
    with open(target / "qwen.tiktoken", "w", encoding="ascii") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode('ascii')} {rank}\n")
    np.savez(target / "mel_filters.npz", mel_80=slaney_mel_filterbank())

    _write_json(
        target / "tokenizer_config.json",
        {
            "model_max_length": 8192,
            "tokenizer_class": "TinyQwenAudioTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_tiny_qwen.TinyQwenAudioTokenizer", None]},
        },
    )
    tokenizer = AutoTokenizer.from_pretrained(str(target), trust_remote_code=True)
    n_tok = len(tokenizer)
    assert tokenizer.audio_end_id == tokenizer.audio_start_id + 1

    auto_map = {
        "AutoConfig": "configuration_tiny_qwen.TinyQwenAudioConfig",
        "AutoModelForCausalLM": "modeling_tiny_qwen.TinyQwenAudioLMHeadModel",
    }
    hidden = 64
    _write_json(
        target / "config.json",
        {
            "architectures": ["TinyQwenAudioLMHeadModel"],
            "auto_map": auto_map,
            "model_type": "tiny_qwen_audio",
            # Like the real checkpoint, the model's vocabulary is larger than the
            # tokenizer's; the extra rows can never be decoded.
            "vocab_size": n_tok + 64,
            "hidden_size": hidden,
            "num_attention_heads": 4,
            "kv_channels": 16,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "seq_length": 2048,
            "max_position_embeddings": 8192,
            "layer_norm_epsilon": 1e-6,
            "rotary_emb_base": 10000,
            # Large init so that greedy outputs clearly depend on the input.
            "initializer_range": 0.3,
            "bf16": False,
            "fp16": False,
            "fp32": True,
            "use_cache": True,
            "tie_word_embeddings": False,
            "audio": {
                "n_mels": 80,
                "n_ctx": 1500,
                "n_state": 64,
                "n_head": 4,
                "n_layer": 2,
                "output_dim": hidden,
                "avg_pool": True,
                "add_audio_bos_eos_token": True,
                "audio_start_id": tokenizer.audio_start_id,
            },
        },
    )
    config = AutoConfig.from_pretrained(str(target), trust_remote_code=True)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    with torch.no_grad():
        head = model.lm_head.weight
        # A real checkpoint never emits ids the tokenizer cannot decode.
        head[n_tok:] = 0.0
        # Keep the random model mostly on ordinary tokens: damp the audio/extra
        # special tokens, but leave <|endoftext|>, <|im_start|>, <|im_end|> alone.
        head[tokenizer.im_end_id + 1 : n_tok] *= 0.05
    model.save_pretrained(str(target), safe_serialization=True)

    # save_pretrained of a remote-code model normally keeps auto_map; make sure.
    saved = json.loads((target / "config.json").read_text(encoding="utf-8"))
    if saved.get("auto_map") != auto_map:
        saved["auto_map"] = auto_map
        _write_json(target / "config.json", saved)

    # Written after save_pretrained, which would store a default one instead.
    _write_json(
        target / "generation_config.json",
        {
            "chat_format": "chatml",
            "eos_token_id": tokenizer.eod_id,
            "pad_token_id": tokenizer.eod_id,
            "max_window_size": 6144,
            "max_new_tokens": 512,
            "do_sample": True,
            "top_k": 0,
            "top_p": 0.5,
        },
    )
    for src in sorted(REMOTE_CODE_DIR.glob("*.py")):
        shutil.copyfile(src, target / src.name)
    return target

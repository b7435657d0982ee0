"""Build a tiny random-weight stand-in for the Qwen-Audio-Chat checkpoint.

Tests must never need the real 20 GB checkpoint. `build_tiny_checkpoint` writes a
directory with the published checkpoint's layout: `config.json` with the official keys
(architecture QWenLMHeadModel, an `audio` section), `generation_config.json`,
`qwen.tiktoken` (a small learned BPE vocabulary followed by the official special
tokens), `mel_filters.npz` and safetensors weights under the official tensor names, taken
from the test reference model (`reference_qwen_audio.py`) with a fixed seed.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import numpy as np

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


def tiny_config(n_ranks: int, *, hidden: int = 64) -> dict:
    from oai_audio_server.models.qwen_audio.tokenizer import AUDIO_START, special_token_names

    n_tok = n_ranks + len(special_token_names())
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        # Like the real checkpoint, the model's vocabulary is larger than the
        # tokenizer's; the extra rows can never be decoded.
        "vocab_size": n_tok + 64,
        "hidden_size": hidden,
        "num_attention_heads": 4,
        "kv_channels": hidden // 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "seq_length": 2048,
        "max_position_embeddings": 8192,
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "scale_attn_weights": True,
        "no_bias": True,
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
            "audio_start_id": n_ranks + special_token_names().index(AUDIO_START),
        },
    }


def build_tiny_checkpoint(target: Path, *, seed: int = 0, shards: int = 1) -> Path:
    """Write a complete tiny Qwen-Audio-Chat-like checkpoint into `target`.

    Deterministic for a given seed; a few MB; takes about a second. ``shards`` > 1 splits
    the weights into that many safetensors files with an index, as large checkpoints are.
    Returns `target`.
    """
    import torch
    from reference_qwen_audio import ReferenceQwenAudio
    from safetensors.torch import save_file

    from oai_audio_server.models.qwen_audio.tokenizer import IM_END, special_token_names

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    ranks = learn_bpe_ranks()
    with open(target / "qwen.tiktoken", "w", encoding="ascii") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode('ascii')} {rank}\n")
    np.savez(target / "mel_filters.npz", mel_80=slaney_mel_filterbank())
    config = tiny_config(len(ranks))
    _write_json(target / "config.json", config)
    names = special_token_names()
    n_tok = len(ranks) + len(names)
    eod = len(ranks)
    im_end = len(ranks) + names.index(IM_END)

    torch.manual_seed(seed)
    model = ReferenceQwenAudio(config)
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("positional_embedding"):
                value = tensor
            elif "ln" in name.split(".")[-2] or name.split(".")[-2].startswith("ln_"):
                ones = name.endswith("weight")
                value = torch.ones_like(tensor) if ones else torch.zeros_like(tensor)
            elif name.endswith("bias"):
                value = torch.randn_like(tensor) * 0.02
            else:
                # Large weights so that greedy outputs clearly depend on the input.
                value = torch.randn_like(tensor) * 0.3
            state[name] = value.contiguous()
        head = state["lm_head.weight"]
        # A real checkpoint never emits ids the tokenizer cannot decode.
        head[n_tok:] = 0.0
        # Keep the random model mostly on ordinary tokens: damp the audio/extra
        # special tokens, but leave <|endoftext|>, <|im_start|>, <|im_end|> alone.
        head[im_end + 1 : n_tok] *= 0.05
        # Answers that run for a while (tests need long generations to join, cancel and
        # time out); the end tokens stay reachable, just less likely.
        head[eod : im_end + 1] *= 0.8
    names_sorted = sorted(state)
    if shards <= 1:
        save_file(state, str(target / "model.safetensors"))
    else:
        weight_map = {}
        for index in range(shards):
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names_sorted[index::shards]}
            save_file(part, str(target / file))
            weight_map.update(dict.fromkeys(part, file))
        _write_json(target / "model.safetensors.index.json",
                    {"metadata": {}, "weight_map": weight_map})
    _write_json(
        target / "generation_config.json",
        {
            "chat_format": "chatml",
            "eos_token_id": eod,
            "pad_token_id": eod,
            "max_window_size": 6144,
            "max_new_tokens": 512,
            "do_sample": True,
            "top_k": 0,
            "top_p": 0.5,
        },
    )
    return target


def load_reference(target: Path):
    """The reference model with the checkpoint's weights (float32, CPU)."""
    import torch
    from reference_qwen_audio import ReferenceQwenAudio
    from safetensors.torch import load_file

    config = json.loads((Path(target) / "config.json").read_text(encoding="utf-8"))
    model = ReferenceQwenAudio(config)
    state = {}
    for file in sorted(Path(target).glob("*.safetensors")):
        state.update(load_file(str(file)))
    model.load_state_dict(state)
    return model.eval().to(torch.float32)

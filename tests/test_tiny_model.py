"""The tiny stand-in checkpoint loads and behaves like Qwen-Audio-Chat's remote code."""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import build_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

GREEDY = {"do_sample": False, "max_new_tokens": 8}


def write_wav(path: Path, samples: np.ndarray, sr: int = 16000) -> str:
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen_audio") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(str(tiny_dir), trust_remote_code=True)


@pytest.fixture(scope="session")
def model(tiny_dir):
    m = AutoModelForCausalLM.from_pretrained(str(tiny_dir), trust_remote_code=True)
    return m.eval()


@pytest.fixture(scope="session")
def audios(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("audio")
    t16 = np.arange(16000) / 16000
    t8 = np.arange(12000) / 8000
    rng = np.random.default_rng(1)
    return {
        "tone": write_wav(d / "tone.wav", 0.5 * np.sin(2 * math.pi * 440 * t16)),
        "noise": write_wav(d / "noise.wav", 0.3 * rng.standard_normal(16000).clip(-3, 3) / 3),
        # 1.5 s at 8 kHz: exercises resampling to 16 kHz.
        "chirp8k": write_wav(
            d / "chirp.wav", 0.5 * np.sin(2 * math.pi * (200 + 600 * t8) * t8), sr=8000
        ),
    }


def test_checkpoint_directory(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "qwen.tiktoken",
        "mel_filters.npz",
        "model.safetensors",
        "configuration_tiny_qwen.py",
        "tokenization_tiny_qwen.py",
        "modeling_tiny_qwen.py",
    ):
        assert name in names
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 20 * 2**20
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (
        config["auto_map"]["AutoModelForCausalLM"] == "modeling_tiny_qwen.TinyQwenAudioLMHeadModel"
    )
    assert config["auto_map"]["AutoConfig"] == "configuration_tiny_qwen.TinyQwenAudioConfig"
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["chat_format"] == "chatml" and gen["max_window_size"] == 6144
    assert (gen["do_sample"], gen["top_k"], gen["top_p"]) == (True, 0, 0.5)
    with np.load(tiny_dir / "mel_filters.npz") as f:
        mel = f["mel_80"]
    assert mel.shape == (80, 201) and mel.dtype == np.float32
    assert (mel.sum(axis=1) > 0).all()


def test_build_is_deterministic(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    other = build_tiny_checkpoint(tmp_path / "again", seed=0)
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_dir / "qwen.tiktoken").read_bytes() == (other / "qwen.tiktoken").read_bytes()


def test_special_token_layout(tokenizer, model):
    n_ranks = len(tokenizer.mergeable_ranks)
    assert tokenizer.eod_id == n_ranks
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (n_ranks + 1, n_ranks + 2)
    assert tokenizer.convert_tokens_to_ids("<|extra_0|>") == n_ranks + 3
    assert tokenizer.audio_pad_id == n_ranks + 3 + 205
    assert tokenizer.audio_end_id == tokenizer.audio_start_id + 1 == len(tokenizer) - 1
    assert tokenizer.AUDIO_ST[-2:] == ("<audio>", "</audio>")
    assert "<|30.00|>" in tokenizer.AUDIO_ST and "<|midi_velocity_127|>" in tokenizer.AUDIO_ST
    assert len(tokenizer) == tokenizer.vocab_size == n_ranks + len(tokenizer.special_tokens)
    assert model.config.vocab_size == len(tokenizer) + 64
    assert model.config.audio["audio_start_id"] == tokenizer.audio_start_id
    assert model.generation_config.eos_token_id == tokenizer.eod_id
    assert model.generation_config.pad_token_id == tokenizer.eod_id
    # Rows the tokenizer cannot decode are never produced.
    assert torch.count_nonzero(model.lm_head.weight[len(tokenizer) :]) == 0


def test_text_round_trip_and_special_handling(tokenizer):
    text = "Hello, how are you today? Ünïcödé 你好 <|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.im_end_id in ids  # the plain encode allows every special token
    restricted = tokenizer.encode(text, allowed_special=set(tokenizer.AUDIO_ST))
    assert tokenizer.im_end_id not in restricted
    assert tokenizer.decode(restricted) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<|im_end|>", "")
    # Learned merges: common words take fewer tokens than bytes.
    assert len(tokenizer.encode("You are a helpful assistant.")) < len(
        "You are a helpful assistant."
    )


def test_from_list_format(tokenizer):
    text = tokenizer.from_list_format(
        [{"audio": "a.flac"}, {"text": "what is said?"}, {"audio": "b.wav"}, {"text": "!"}]
    )
    assert text == "Audio 1:<audio>a.flac</audio>\nwhat is said?Audio 2:<audio>b.wav</audio>\n!"
    assert tokenizer.extract_audio_urls(text) == ["a.flac", "b.wav"]


def test_process_audio(tokenizer, audios):
    assert tokenizer.process_audio("no audio here") is None
    text = tokenizer.from_list_format([{"audio": audios["tone"]}, {"audio": audios["chirp8k"]}])
    info = tokenizer.process_audio(text)
    assert info["input_audios"].shape == (2, 80, 3000)
    assert info["input_audios"].dtype == torch.float32
    assert info["input_audio_lengths"].dtype == torch.int32
    # 1 s: 100 mel frames -> 50 after the convolutions -> 25 tokens (+2 tags).
    # 1.5 s at 8 kHz is resampled to 24000 samples: 150 -> 75 -> 37.
    assert info["input_audio_lengths"].tolist() == [[50, 25], [75, 37]]
    assert info["audio_span_tokens"] == [27, 39]
    assert info["audio_urls"] == [audios["tone"], audios["chirp8k"]]
    mel = info["input_audios"][0]
    assert mel.max() <= 1.5 and mel.max() - mel.min() <= 2.0 + 1e-6

    ids = tokenizer.encode(text, allowed_special=set(tokenizer.AUDIO_ST), audio_info=info)
    assert ids.count(tokenizer.audio_start_id) == 2
    assert ids.count(tokenizer.audio_pad_id) == 25 + 37
    start = ids.index(tokenizer.audio_start_id)
    assert ids[start + 26] == tokenizer.audio_end_id
    assert tokenizer.decode(ids, audio_info=info) == text


def test_chat_without_audio(model, tokenizer):
    history = [("Hi", "Hello!")]
    response, new_history = model.chat(tokenizer, "What time is it?", history=history, **GREEDY)
    assert isinstance(response, str)
    assert new_history == [("Hi", "Hello!"), ("What time is it?", response)]
    assert history == [("Hi", "Hello!")]  # the caller's history is left alone
    again, _ = model.chat(tokenizer, "What time is it?", history=history, **GREEDY)
    assert again == response
    other, _ = model.chat(tokenizer, "Where are we?", history=None, **GREEDY)
    assert other != response


def test_chat_with_audio_depends_on_audio(model, tokenizer, audios):
    answers = []
    for name in ("tone", "noise"):
        query = tokenizer.from_list_format([{"audio": audios[name]}, {"text": "What is said?"}])
        response, history = model.chat(tokenizer, query, history=None, **GREEDY)
        assert history == [(query, response)]
        answers.append(response)
    assert answers[0] != answers[1]


def test_chat_with_audio_in_history(model, tokenizer, audios):
    q1 = tokenizer.from_list_format([{"audio": audios["tone"]}, {"text": "What is it?"}])
    r1, history = model.chat(tokenizer, q1, history=None, **GREEDY)
    r2, history = model.chat(tokenizer, "And now?", history=history, **GREEDY)
    assert history == [(q1, r1), ("And now?", r2)]
    q3 = tokenizer.from_list_format([{"audio": audios["noise"]}, {"text": "And this one?"}])
    r3, history = model.chat(tokenizer, q3, history=history, **GREEDY)
    assert len(history) == 3 and isinstance(r3, str)


def _audio_prompt(tokenizer, path: str):
    text = tokenizer.from_list_format([{"audio": path}, {"text": "Transcribe the audio."}])
    info = tokenizer.process_audio(text)
    ids = tokenizer.encode(text, allowed_special=set(tokenizer.AUDIO_ST), audio_info=info)
    return ids, info


def test_generate_with_audio_info(model, tokenizer, audios):
    ids_a, info_a = _audio_prompt(tokenizer, audios["tone"])
    ids_b, info_b = _audio_prompt(tokenizer, audios["noise"])
    assert ids_a == ids_b  # same length audios: only the features differ
    input_ids = torch.tensor([ids_a])
    out_a = model.generate(input_ids, audio_info=info_a, **GREEDY)
    out_b = model.generate(input_ids, audio_info=info_b, **GREEDY)
    assert out_a.shape[1] > input_ids.shape[1]
    assert torch.equal(out_a[:, : input_ids.shape[1]], input_ids)
    assert not torch.equal(out_a, out_b)
    with pytest.raises(ValueError):
        model(input_ids)  # audio tokens without audio_info


def test_legacy_cache_and_ignored_position_ids(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("The quick brown fox")])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        shifted = model(ids, position_ids=torch.arange(ids.shape[1])[None] + 100)
    assert isinstance(out.past_key_values, tuple) and len(out.past_key_values) == 2
    key, value = out.past_key_values[0]
    assert key.shape == value.shape == (1, ids.shape[1], 4, 16)
    assert torch.equal(out.logits, shifted.logits)


def test_stop_words_force_eos(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("Hello, how are you today?")])
    first = model.generate(ids, **GREEDY)[0, ids.shape[1]].item()
    out = model.generate(ids, stop_words_ids=[[first]], **GREEDY)[0, ids.shape[1] :].tolist()
    assert out == [first, tokenizer.eod_id]


def _left_pad(rows: list[list[int]], pad_id: int):
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_batched_left_padding_matches_single(model, tokenizer, audios):
    pad = tokenizer.eod_id
    texts = ["Hi", "Summarize what the speaker is talking about in one sentence."]
    rows = [tokenizer.encode(t) for t in texts]
    ids, mask = _left_pad(rows, pad)
    batch = model.generate(ids, attention_mask=mask, pad_token_id=pad, **GREEDY)
    for i, row in enumerate(rows):
        single = model.generate(torch.tensor([row]), pad_token_id=pad, **GREEDY)[0, len(row) :]
        got = batch[i, ids.shape[1] :][: len(single)]
        assert got.tolist() == single.tolist()

    prompts = [
        _audio_prompt(tokenizer, audios["chirp8k"]),
        _audio_prompt(tokenizer, audios["noise"]),
    ]
    ids, mask = _left_pad([p[0] for p in prompts], pad)
    batch = model.generate(
        ids, attention_mask=mask, audio_info=[p[1] for p in prompts], pad_token_id=pad, **GREEDY
    )
    for i, (row, info) in enumerate(prompts):
        single = model.generate(torch.tensor([row]), audio_info=info, pad_token_id=pad, **GREEDY)
        single = single[0, len(row) :]
        assert batch[i, ids.shape[1] :][: len(single)].tolist() == single.tolist()

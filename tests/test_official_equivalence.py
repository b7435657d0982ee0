"""Opt-in (OAS_QWEN_AUDIO_REPO): the native engine against the official remote code.

The session checkpoint is then built from the official code (conftest), and the
official ``model.chat`` runs in its own interpreter (official_side.py). For the same
conversations: the prompt ids the server builds equal the ids ``make_context`` hands to
``generate``; the audio features and spans are the same; the float32 logits of the
prompt's last position are within 1e-4; the greedy answers through the HTTP server equal
``model.chat``'s.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from media import audio_part, tone, wav_bytes
from official_checkpoint import REPO_ENV, official_chat, official_repo
from paged_driver import PagedDriver
from server_process import ServerProcess

from oai_audio_server.audio.intake import AudioIntake
from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.qwen.conversation import AudioItem, Conversation, HistoryTurn, TextItem
from oai_audio_server.qwen.prompt import QwenPromptBuilder
from oai_audio_server.settings import Settings

pytestmark = pytest.mark.skipif(
    official_repo() is None, reason=f"set {REPO_ENV} to a QwenLM/Qwen-Audio checkout"
)

MAX_TOKENS = 24
TOLERANCE = 1e-4

# The official tokenizer loads audio files with the ffmpeg command line (the server never
# does); without it only the text-only case can run on the official side.
HAS_FFMPEG = shutil.which("ffmpeg") is not None

CASES: dict[str, tuple[str, list, list[tuple[str, str]]]] = {
    "text only": ("You are a helpful assistant.", [], [("text", "Hello, who are you?")]),
    "one audio": ("You are a helpful assistant.", [],
                  [("audio", "a"), ("text", "What does the person say?")]),
    "two audios": ("Be brief.", [], [("audio", "a"), ("audio", "b"), ("text", "Compare.")]),
    "history with audio": (
        "You are a helpful assistant.",
        [([("audio", "c"), ("text", "What is this?")], "It is a low tone.")],
        [("audio", "b"), ("text", "And this one?")],
    ),
}


def _runnable() -> list[str]:
    return [name for name in CASES if HAS_FFMPEG or name == "text only"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    paths = {}
    for name, seconds, hz in (("a", 1.0, 330.0), ("b", 2.5, 880.0), ("c", 0.7, 150.0)):
        paths[name] = folder / f"{name}.wav"
        paths[name].write_bytes(wav_bytes(tone(seconds, hz)))
    return paths


def _list_format(items: list[tuple[str, str]], clips: dict[str, Path]) -> str:
    """The official from_list_format, as the published tokenizer writes it."""
    text, audios = "", 0
    for kind, value in items:
        if kind == "audio":
            audios += 1
            text += f"Audio {audios}:<audio>{clips[value]}</audio>\n"
        else:
            text += value
    return text


@pytest.fixture(scope="module")
def official(tiny_checkpoint: Path, clips: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    jobs = []
    for name in _runnable():
        system, history, query = CASES[name]
        jobs.append({
            "system": system,
            "history": [[_list_format(q, clips), a] for q, a in history],
            "query": _list_format(query, clips),
            # The official decoder drops the last token when it stops at the length
            # limit, so it gets one more to produce the same text.
            "max_new_tokens": MAX_TOKENS + 1,
        })
    results = official_chat(tiny_checkpoint, jobs, tmp_path_factory.mktemp("official"))
    return dict(zip(_runnable(), results, strict=True))


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path) -> ModelBundle:
    return load_bundle(Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32"))


def _conversation(name: str, bundle: ModelBundle, clips: dict[str, Path]) -> Conversation:
    system, history, query = CASES[name]
    intake = AudioIntake(Settings(model="x"), bundle.mel)

    def items(spec: list[tuple[str, str]]) -> tuple:
        out: list = []
        for kind, value in spec:
            if kind == "audio":
                prepared = asyncio.run(intake.from_bytes(clips[value].read_bytes(), "wav"))
                out.append(AudioItem(prepared))
            else:
                out.append(TextItem(value))
        return tuple(out)

    return Conversation(
        system=system,
        history=tuple(HistoryTurn(items(q), a) for q, a in history),
        query=items(query),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_audio_and_logits_equal_the_official_forward(
    name: str, official: dict, bundle: ModelBundle, clips: dict[str, Path]
) -> None:
    if name not in official:
        pytest.skip("the official tokenizer needs the ffmpeg command line to load audio")
    expected = official[name]
    prompt = QwenPromptBuilder(bundle.tokenizer, max_window_size=6144).build(
        _conversation(name, bundle, clips)
    )
    assert prompt.token_ids == expected["input_ids"]
    assert [s.token_count + 2 for s in prompt.audio_segments] == expected["audio_span_tokens"]
    lengths = [[s.length_after_cnn, s.token_count] for s in prompt.audio_segments]
    assert lengths == expected["input_audio_lengths"]
    if prompt.audio_segments:
        ours = torch.stack([s.mel for s in prompt.audio_segments])
        assert torch.allclose(ours, torch.tensor(expected["input_audios"]), atol=1e-4)
    assert bundle.model is not None
    driver = PagedDriver(bundle.model, max_len=bundle.max_model_len, rows=1)
    with torch.inference_mode():
        logits = driver.prefill([prompt.token_ids], [prompt.audio_segments])
    theirs = torch.tensor(expected["last_logits"])
    assert torch.allclose(logits[0], theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_answer_through_the_server_equals_official_chat(
    name: str, official: dict, server: ServerProcess, clips: dict[str, Path]
) -> None:
    if name not in official:
        pytest.skip("the official tokenizer needs the ffmpeg command line to load audio")
    system, history, query = CASES[name]

    def content(spec: list[tuple[str, str]]) -> list[dict]:
        return [audio_part(clips[v].read_bytes()) if k == "audio" else {"type": "text", "text": v}
                for k, v in spec]

    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for turn, answer in history:
        messages += [{"role": "user", "content": content(turn)},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": content(query)})
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="qwen-audio-chat", messages=messages, temperature=0, max_tokens=MAX_TOKENS
    )
    assert reply.choices[0].message.content == official[name]["response"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(official[name]["input_ids"])

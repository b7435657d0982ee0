"""Structured outputs, log probabilities, n, penalties, logit_bias and file parts, over
real HTTP through the official openai client (issue #22)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from media import b64, tone, wav_bytes
from pydantic import BaseModel
from server_process import ServerProcess

from oai_audio_server.models.registry import family_named

MODEL = "qwen-audio-chat"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, messages: list = HELLO, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def post(server: ServerProcess, body: dict) -> httpx.Response:
    return httpx.post(server.api_url + "/chat/completions", json=body, timeout=60)


class Verdict(BaseModel):
    ok: bool
    colour: Literal["red", "green", "blue"]
    score: Literal[1, 2, 3]


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    # A random-weight model: only the grammar can make this valid.
    reply = client.chat.completions.parse(
        model=MODEL, messages=HELLO, response_format=Verdict, max_tokens=48, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Verdict)
    assert json.loads(choice.message.content or "") == choice.message.parsed.model_dump()
    assert " " not in (choice.message.content or "")  # compact: no free whitespace


def test_json_object_and_sampled_schema_rows(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"yes": {"type": "boolean"}},
              "required": ["yes"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    for seed in (1, 2, 3):
        reply = ask(client, response_format=fmt, temperature=1.0, seed=seed, max_tokens=32)
        assert isinstance(json.loads(reply.choices[0].message.content or "")["yes"], bool)
    reply = ask(client, response_format={"type": "json_object"}, max_tokens=60)
    content = reply.choices[0].message.content or ""
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: a prefix of an object
        assert content.startswith("{")


def test_a_schema_the_library_refuses_is_400(server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/nowhere"}}}}
    error = post(server, body).json()["error"]
    assert error["param"] == "response_format.json_schema.schema", error
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert post(server, body).json()["error"]["param"] == "response_format.json_schema.schema"
    body["response_format"] = {"type": "xml"}
    assert post(server, body).json()["error"]["param"] == "response_format.type"


def test_logprobs_in_json_and_in_a_stream(client: openai.OpenAI) -> None:
    reply = ask(client, logprobs=True, top_logprobs=3, max_tokens=8)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens - (  # type: ignore[union-attr]
        1 if reply.choices[0].finish_reason == "stop" else 0)
    text = reply.choices[0].message.content or ""
    joined = b"".join(bytes(e.bytes or []) for e in content)
    assert joined.decode("utf-8", "replace").strip() == text
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-5)
        assert entry.token == entry.top_logprobs[0].token
    chunks = list(ask(client, logprobs=True, top_logprobs=2, max_tokens=8, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    assert ask(client).choices[0].logprobs is None


def test_n_choices_with_a_seed(client: openai.OpenAI) -> None:
    kwargs = {"n": 3, "seed": 5, "temperature": 1.0, "max_tokens": 12}
    first = ask(client, **kwargs)
    again = ask(client, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # the choices differ from each other
    assert first.usage.completion_tokens > 12  # type: ignore[union-attr]
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError):
        ask(client, n=9)


def test_penalties_change_a_greedy_answer(client: openai.OpenAI) -> None:
    plain = ask(client, max_tokens=40).choices[0].message.content
    assert ask(client, max_tokens=40, presence_penalty=2.0).choices[0].message.content != plain
    assert ask(client, max_tokens=40, frequency_penalty=2.0).choices[0].message.content != plain


def test_logit_bias_bans_a_token(client: openai.OpenAI, tiny_checkpoint: Path) -> None:
    ids = {raw: i for i, raw in enumerate(family_named("qwen-audio").tokenizer(
        tiny_checkpoint).token_bytes())}
    reply = ask(client, logprobs=True, max_tokens=6)
    first = bytes(reply.choices[0].logprobs.content[0].bytes or [])  # type: ignore[union-attr, index]
    banned = ask(client, logprobs=True, max_tokens=6, logit_bias={str(ids[first]): -100})
    tokens = [bytes(e.bytes or []) for e in banned.choices[0].logprobs.content or []]  # type: ignore[union-attr]
    assert tokens and first not in tokens
    forced = ask(client, logprobs=True, max_tokens=3, logit_bias={str(ids[b"{"]): 100})
    assert [e.token for e in forced.choices[0].logprobs.content or []] == ["{"] * 3  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError):
        ask(client, logit_bias={"-1": 5})


def test_file_part_carrying_audio(client: openai.OpenAI, server: ServerProcess) -> None:
    wav = wav_bytes(tone(1.0))
    as_input_audio = ask(client, [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}}]}])
    # LangChain's standard {"type": "file", "mime_type": "audio/wav", ...} block, as
    # langchain-openai sends it.
    as_file = ask(client, [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "file", "file": {"file_data": f"data:audio/wav;base64,{b64(wav)}",
                                  "filename": "a.wav"}}]}])
    assert as_file.choices[0].message.content == as_input_audio.choices[0].message.content
    assert as_file.usage.prompt_tokens == as_input_audio.usage.prompt_tokens  # type: ignore[union-attr]
    for part in ({"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA"}},
                 {"type": "file", "file": {"file_id": "file-123"}}):
        body = {"model": MODEL, "max_tokens": 2,
                "messages": [{"role": "user", "content": [part]}]}
        error = post(server, body).json()["error"]
        assert error["param"].startswith("messages[0].content[0]"), error
        assert error["code"] == "unsupported_content_type"
        assert "input_audio" in error["message"]

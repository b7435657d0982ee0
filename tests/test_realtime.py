"""/v1/realtime over a real WebSocket: the openai SDK's realtime client, and a raw client
for bad input, auth and limits.

Every server event is validated against the SDK's own pydantic models
(``openai.types.realtime``), which the SDK itself only constructs without checking.
The tiny model writes random (greedy) text, so transcripts are compared with what
/v1/audio/transcriptions gives for the same audio, never with particular words.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pydantic
import pytest
from media import encode, tone, wav_bytes
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from server_process import SUITE_FLAGS, ServerProcess, running_server
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

RATE = 24000
KEY = "rt-secret"



def _models_by_type() -> dict[str, type[pydantic.BaseModel]]:
    union = typing.get_args(RealtimeServerEvent)[0]  # Annotated[Union[...], discriminator]
    return {
        typing.get_args(model.model_fields["type"].annotation)[0]: model
        for model in typing.get_args(union)
    }


SERVER_EVENTS = _models_by_type()
WAIT_SECONDS = 120.0


def checked(raw: str | bytes) -> dict[str, Any]:
    """A server event, after checking it against the SDK's strict model."""
    event: dict[str, Any] = json.loads(raw)
    SERVER_EVENTS[event["type"]].model_validate(event, strict=False)
    return event


def pcm24(seconds: float, frequency: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = tone(seconds, frequency, RATE) + 0.02 * rng.standard_normal(int(seconds * RATE))
    return (np.clip(signal, -1, 1) * 32767).astype("<i2")


def chunks_b64(samples: np.ndarray, chunk_ms: int = 100) -> list[str]:
    step = RATE * chunk_ms // 1000
    return [
        base64.b64encode(samples[i : i + step].tobytes()).decode()
        for i in range(0, samples.shape[0], step)
    ]


MANUAL = {"type": "session.update", "session": {
    "type": "transcription", "audio": {"input": {"turn_detection": None}}}}


def http_transcript(server: ServerProcess, samples: np.ndarray, rate: int = RATE) -> str:
    """What /v1/audio/transcriptions says for the same samples as a WAV file."""
    data = wav_bytes(samples.astype(np.float32) / 32767, rate)
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
    return client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data)).text


def ws_url(server: ServerProcess, query: str) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/realtime?" + query


def receive_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Events up to and including the first of type ``kind`` (each one checked)."""
    events = []
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        event = checked(ws.recv(timeout=WAIT_SECONDS))
        events.append(event)
        if event["type"] == kind:
            return events
    raise AssertionError(f"no {kind} event within {WAIT_SECONDS} s: {events}")


def send(ws: ClientConnection, event: dict[str, Any] | str) -> None:
    ws.send(event if isinstance(event, str) else json.dumps(event))


def batch_size(server: ServerProcess) -> int:
    return int(httpx.get(server.base_url + "/health").json()["batch_size"])


def wait_batch_empty(server: ServerProcess) -> None:
    """Until the engine holds no row (bounded)."""
    deadline = time.monotonic() + 30
    while batch_size(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batch_size(server) == 0


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


# ---------------------------------------------------------------- transcription


def test_manual_commit_transcript_equals_http(server: ServerProcess, sdk: openai.OpenAI) -> None:
    samples = pcm24(1.5, 300.0, seed=1)
    with sdk.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = checked(conn.recv_bytes())
        assert created["type"] == "session.created"
        assert created["session"]["type"] == "transcription"
        conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": RATE},
                        "transcription": {"model": "whisper-1"},
                        "turn_detection": None,
                    }
                },
            }
        )
        updated = checked(conn.recv_bytes())
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["audio"]["input"]["turn_detection"] is None
        for chunk in chunks_b64(samples):
            conn.input_audio_buffer.append(audio=chunk)
        conn.input_audio_buffer.commit()
        deltas, kinds = [], []
        while True:
            event = checked(conn.recv_bytes())
            kinds.append(event["type"])
            if event["type"] == "conversation.item.input_audio_transcription.delta":
                deltas.append(event["delta"])
            if event["type"] == "conversation.item.input_audio_transcription.completed":
                completed = event
                break
            assert event["type"] != "error", event
    assert kinds[:2] == ["input_audio_buffer.committed", "conversation.item.added"]
    assert completed["transcript"] == "".join(deltas)
    assert completed["usage"]["output_tokens"] > 0
    assert completed["transcript"] == http_transcript(server, samples)


def test_transcription_logprobs_when_included(server: ServerProcess) -> None:
    """include: item.input_audio_transcription.logprobs: each delta carries the log
    probabilities of its tokens and the completed event all of them, the same tokens and
    values as /v1/audio/transcriptions' include[]=logprobs on the same audio."""
    samples = pcm24(1.5, 300.0, seed=1)
    with connect(ws_url(server, "intent=transcription")) as ws:
        receive_until(ws, "session.created")
        send(ws, {"type": "session.update", "session": {
            "type": "transcription", "include": ["item.input_audio_transcription.logprobs"],
            "audio": {"input": {"turn_detection": None}}}})
        updated = receive_until(ws, "session.updated")[-1]
        assert updated["session"]["include"] == ["item.input_audio_transcription.logprobs"]
        for chunk in chunks_b64(samples):
            send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        send(ws, {"type": "input_audio_buffer.commit"})
        events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
    streamed = [entry for event in events
                if event["type"] == "conversation.item.input_audio_transcription.delta"
                for entry in event["logprobs"]]
    completed = events[-1]["logprobs"]
    assert completed and streamed == completed
    data = wav_bytes(samples.astype(np.float32) / 32767, RATE)
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
    http = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data),
                                              include=["logprobs"]).logprobs or []
    assert [e["token"] for e in completed] == [e.token for e in http]
    assert all(math.isclose(e["logprob"], h.logprob, abs_tol=1e-4)
               for e, h in zip(completed, http, strict=True))


def test_server_vad_transcript_equals_http(server: ServerProcess) -> None:
    quiet = np.zeros(RATE, dtype="<i2")
    speech = pcm24(1.2, 440.0, seed=2)
    samples = np.concatenate([quiet, speech, quiet])
    with connect(ws_url(server, "intent=transcription")) as ws:
        receive_until(ws, "session.created")
        send(ws, {"type": "session.update", "session": {
            "type": "transcription",
            "audio": {"input": {"turn_detection": {"type": "server_vad",
                                                   "silence_duration_ms": 300}}},
        }})
        receive_until(ws, "session.updated")
        for chunk in chunks_b64(samples):
            send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        events = receive_until(ws, "conversation.item.input_audio_transcription.completed")
    by_type = {event["type"]: event for event in events}
    start = by_type["input_audio_buffer.speech_started"]["audio_start_ms"]
    end = by_type["input_audio_buffer.speech_stopped"]["audio_end_ms"]
    # Speech begins at 1000 ms; the start includes the 300 ms prefix padding, the end
    # the 300 ms of silence that ended the turn.
    assert 600 <= start <= 760, start
    assert 2200 + 300 <= end <= 2200 + 300 + 100, end
    assert by_type["input_audio_buffer.committed"]["item_id"] == (
        by_type["input_audio_buffer.speech_started"]["item_id"]
    )
    turn = samples[start * RATE // 1000 : end * RATE // 1000]
    completed = by_type["conversation.item.input_audio_transcription.completed"]
    assert completed["transcript"] == http_transcript(server, turn)


def test_g711_and_16khz_inputs_equal_http(server: ServerProcess) -> None:
    """The same audio as a file: 16 kHz PCM as a WAV, G.711 as FFmpeg's own mu-law and
    A-law WAV files (so the expansion tables are checked against FFmpeg's decoder)."""
    signal = tone(1.0, 500.0, 8000) * 0.8
    samples16 = pcm24(1.0, 500.0, seed=3)[::3].copy()
    cases = []
    for fmt, codec in (("audio/pcmu", "pcm_mulaw"), ("audio/pcma", "pcm_alaw")):
        raw = encode(signal, 8000, container=codec.removeprefix("pcm_"), codec=codec)
        cases.append(({"type": fmt}, raw, encode(signal, 8000, container="wav", codec=codec)))
    pcm16_file = wav_bytes(samples16.astype(np.float32) / 32767, 16000)
    cases.append(({"type": "audio/pcm", "rate": 16000}, samples16.tobytes(), pcm16_file))
    http = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
    with connect(ws_url(server, "intent=transcription")) as ws:
        receive_until(ws, "session.created")
        for fmt, raw, file in cases:
            send(ws, {"type": "session.update", "session": {
                "type": "transcription",
                "audio": {"input": {"format": fmt, "turn_detection": None}}}})
            # 16 kHz is this server's extension: the SDK's model only allows 24000.
            message = ws.recv(timeout=WAIT_SECONDS)
            updated = json.loads(message) if fmt.get("rate") == 16000 else checked(message)
            assert updated["type"] == "session.updated"
            assert updated["session"]["audio"]["input"]["format"] == fmt
            send(ws, {"type": "input_audio_buffer.append", "audio": base64.b64encode(raw).decode()})
            send(ws, {"type": "input_audio_buffer.commit"})
            events = receive_until(ws, "conversation.item.done")
            assert not [e for e in events if e["type"] == "error"], events
            completed = events[-2]
            assert completed["type"] == "conversation.item.input_audio_transcription.completed"
            assert events[-1]["item"]["content"][0]["transcript"] == completed["transcript"]
            expected = http.audio.transcriptions.create(model="whisper-1", file=("a.wav", file))
            assert completed["transcript"] == expected.text, fmt


# ---------------------------------------------------------------- conversation


def test_two_turn_conversation_keeps_history(server: ServerProcess, sdk: openai.OpenAI) -> None:
    with sdk.realtime.connect(model="qwen-audio-chat") as conn:
        created = checked(conn.recv_bytes())
        assert created["session"]["type"] == "realtime"
        assert created["session"]["output_modalities"] == ["text"]
        conn.session.update(session={"type": "realtime", "instructions": "Be brief.",
                                     "audio": {"input": {"turn_detection": None}}})
        assert checked(conn.recv_bytes())["type"] == "session.updated"
        texts = []
        for turn in range(2):
            conn.conversation.item.create(item={
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": f"Question {turn}?"}],
            })
            for _ in range(2):
                assert checked(conn.recv_bytes())["type"] in (
                    "conversation.item.added", "conversation.item.done")
            conn.response.create()
            deltas = []
            while True:
                event = checked(conn.recv_bytes())
                assert event["type"] != "error", event
                if event["type"] == "response.output_text.delta":
                    deltas.append(event["delta"])
                if event["type"] == "response.output_text.done":
                    assert event["text"] == "".join(deltas)
                if event["type"] == "response.done":
                    done = event
                    break
            assert done["response"]["status"] in ("completed", "incomplete")
            assert done["response"]["output"][0]["content"][0]["text"] == "".join(deltas)
            texts.append("".join(deltas))
            if turn == 0:
                first_prompt = done["response"]["usage"]["input_tokens"]
    # The second prompt holds the first turn and its answer.
    assert done["response"]["usage"]["input_tokens"] > first_prompt
    assert all(texts)


def health(server: ServerProcess) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(server.base_url + "/health").json()
    return counts


# Greedy answers of the tiny checkpoint to "Hello" run 603 tokens (see
# test_concurrency_http.py): still being written when the test acts.
LONG_ANSWER = {"type": "response.create", "response": {"temperature": 0}}
HELLO = {"type": "conversation.item.create", "item": {
    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}}


def test_cancel_ends_the_response_and_frees_the_row(server: ServerProcess) -> None:
    before = health(server)
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, {"type": "session.update", "session": {
            "type": "realtime", "max_output_tokens": 2000}})
        send(ws, HELLO)
        send(ws, LONG_ANSWER)
        receive_until(ws, "response.output_text.delta")
        send(ws, {"type": "response.cancel"})
        events = receive_until(ws, "response.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert done["output"][0]["status"] == "incomplete"
        wait_batch_empty(server)
        assert health(server)["cancelled"] == before["cancelled"] + 1
        # Cancelling again: nothing is active; an error, and the session goes on.
        send(ws, {"type": "response.cancel", "event_id": "c2"})
        error = receive_until(ws, "error")[-1]["error"]
        assert (error["code"], error["event_id"]) == ("response_cancel_not_active", "c2")


def test_conversation_equals_chat_completions(server: ServerProcess) -> None:
    """The same turns as chat messages give the same prompt and the same greedy answer."""
    samples = pcm24(0.8, 260.0, seed=8)
    audio_b64 = base64.b64encode(samples.tobytes()).decode()
    wav_b64 = base64.b64encode(wav_bytes(samples.astype(np.float32) / 32767, RATE)).decode()
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, {"type": "session.update", "session": {
            "type": "realtime", "instructions": "You answer briefly.",
            "audio": {"input": {"turn_detection": None}}}})
        for role, content in (
            ("user", [{"type": "input_text", "text": "Hi."}]),
            ("assistant", [{"type": "output_text", "text": "Hello."}]),
            ("user", [{"type": "input_audio", "audio": audio_b64},
                      {"type": "input_text", "text": "What is this?"}]),
        ):
            send(ws, {"type": "conversation.item.create",
                      "item": {"type": "message", "role": role, "content": content}})
            receive_until(ws, "conversation.item.done")
        send(ws, {"type": "response.create",
                  "response": {"temperature": 0, "max_output_tokens": 24}})
        done = receive_until(ws, "response.done")[-1]["response"]
    chat = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
    reply = chat.chat.completions.create(
        model="qwen-audio-chat", temperature=0, max_tokens=24,
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": wav_b64, "format": "wav"}},
                {"type": "text", "text": "What is this?"}]},
        ],
    )
    assert reply.usage is not None
    assert done["usage"]["input_tokens"] == reply.usage.prompt_tokens
    assert done["output"][0]["content"][0]["text"] == reply.choices[0].message.content


def test_audio_turn_gets_an_answer(server: ServerProcess) -> None:
    samples = pcm24(1.0, 350.0, seed=4)
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, {"type": "session.update", "session": {
            "type": "realtime", "max_output_tokens": 2000,
            "audio": {"input": {"turn_detection": None}}}})
        receive_until(ws, "session.updated")
        send(ws, {"type": "input_audio_buffer.append",
                  "audio": base64.b64encode(samples.tobytes()).decode()})
        send(ws, {"type": "input_audio_buffer.commit"})
        receive_until(ws, "conversation.item.done")
        send(ws, {"type": "response.create"})
        events = receive_until(ws, "response.done")
    done = events[-1]["response"]
    assert done["status"] in ("completed", "incomplete"), done
    # The committed audio is in the prompt: many more tokens than the template alone.
    assert done["usage"]["input_tokens"] > 20
    kinds = [event["type"] for event in events]
    assert kinds[:4] == ["response.created", "response.output_item.added",
                         "conversation.item.added", "response.content_part.added"]
    assert kinds[-5:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "conversation.item.done", "response.done"]


def test_vad_turns_answer_and_interrupt(server: ServerProcess) -> None:
    """Server VAD in a conversation: a turn's end starts a response (create_response), and
    speech during a response cancels it (interrupt_response)."""
    quiet = np.zeros(RATE // 2, dtype="<i2")
    turn = np.concatenate([quiet, pcm24(1.0, 380.0, seed=9), quiet, quiet])
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        created = receive_until(ws, "session.created")[-1]
        assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        for chunk in chunks_b64(turn):
            send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        events = receive_until(ws, "response.done")
        kinds = [event["type"] for event in events]
        assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index(
            "input_audio_buffer.committed") < kinds.index("response.created")
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
        send(ws, HELLO)
        send(ws, LONG_ANSWER)
        receive_until(ws, "response.output_text.delta")
        send(ws, {"type": "input_audio_buffer.append", "audio": chunks_b64(turn, 1000)[1]})
        done = receive_until(ws, "response.done")[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"]["reason"] == "turn_detected"
    wait_batch_empty(server)


def test_disconnect_frees_rows(server: ServerProcess) -> None:
    before = health(server)
    ws = connect(ws_url(server, "model=qwen-audio-chat"))
    receive_until(ws, "session.created")
    send(ws, {"type": "session.update", "session": {"type": "realtime",
                                                    "max_output_tokens": 2000}})
    send(ws, HELLO)
    send(ws, LONG_ANSWER)
    receive_until(ws, "response.output_text.delta")
    ws.close()
    wait_batch_empty(server)
    after = health(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"]


# ---------------------------------------------------------------- bad input


def test_bad_events_get_errors_and_the_session_goes_on(server: ServerProcess) -> None:
    with connect(ws_url(server, "intent=transcription")) as ws:
        receive_until(ws, "session.created")
        send(ws, MANUAL)
        receive_until(ws, "session.updated")
        bad: list[tuple[dict[str, Any] | str, str]] = [
            ("{not json", "invalid_json"),
            ({"type": "no.such.event", "event_id": "e1"}, "invalid_value"),
            ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_base64"),
            ({"type": "input_audio_buffer.append"}, "invalid_value"),
            ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty"),
            ({"type": "response.create"}, "invalid_value"),
            ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value"),
            ({"type": "session.update", "session": {
                "type": "transcription", "include": ["item.output_text.logprobs"]}},
             "unsupported_value"),
        ]
        for event, code in bad:
            send(ws, event)
            error = receive_until(ws, "error")[-1]["error"]
            assert error["code"] == code, (event, error)
            assert error["message"]
        ws.send(b"\x00binary")
        assert receive_until(ws, "error")[-1]["error"]["code"] == "invalid_json"
        # Still alive: a good commit is transcribed.
        send(ws, {"type": "input_audio_buffer.append",
                  "audio": base64.b64encode(pcm24(0.5, 300, 5).tobytes()).decode()})
        send(ws, {"type": "input_audio_buffer.commit"})
        receive_until(ws, "conversation.item.input_audio_transcription.completed")


def test_unknown_event_names_the_param_and_event_id(server: ServerProcess) -> None:
    with connect(ws_url(server, "intent=transcription")) as ws:
        receive_until(ws, "session.created")
        send(ws, {"type": "nope", "event_id": "evt-7"})
        error = receive_until(ws, "error")[-1]["error"]
        assert (error["param"], error["event_id"], error["type"]) == (
            "type", "evt-7", "invalid_request_error")


def test_eight_concurrent_sessions(server: ServerProcess) -> None:
    samples = pcm24(0.6, 420.0, seed=6)
    expected = http_transcript(server, samples)
    results: list[str] = []
    failures: list[BaseException] = []

    def one() -> None:
        try:
            with connect(ws_url(server, "intent=transcription")) as ws:
                receive_until(ws, "session.created")
                send(ws, MANUAL)
                send(ws, {"type": "input_audio_buffer.append",
                          "audio": base64.b64encode(samples.tobytes()).decode()})
                send(ws, {"type": "input_audio_buffer.commit"})
                done = receive_until(ws, "conversation.item.input_audio_transcription.completed")
                results.append(done[-1]["transcript"])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    assert not failures, failures
    assert results == [expected] * 8


# ---------------------------------------------------------------- auth and limits


@pytest.fixture(scope="module")
def limited(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServerProcess]:
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("rt-logs"), *SUITE_FLAGS,
        "--api-key", KEY, "--realtime-max-sessions", "2",
        "--realtime-max-session-seconds", "4", "--realtime-max-buffer-seconds", "2",
    ) as process:
        yield process


def closed_after_error(ws: ClientConnection) -> dict[str, Any]:
    error = receive_until(ws, "error")[-1]["error"]
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    return error


def test_api_key_as_header_or_subprotocol(limited: ServerProcess) -> None:
    url = ws_url(limited, "intent=transcription")
    with connect(url) as ws:
        assert closed_after_error(ws)["code"] == "missing_api_key"
    with connect(url, additional_headers={"Authorization": "Bearer wrong"}) as ws:
        assert closed_after_error(ws)["code"] == "invalid_api_key"
    with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        assert receive_until(ws, "session.created")
    with connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime"  # the key is never echoed back
        assert receive_until(ws, "session.created")


def test_other_sites_cannot_connect(limited: ServerProcess) -> None:
    """A browser page from another origin is refused (browsers apply no CORS to
    WebSockets); the server's own page and clients without an Origin are not."""
    url = ws_url(limited, "intent=transcription")
    auth = {"Authorization": f"Bearer {KEY}"}
    with connect(url, additional_headers=auth, origin=Origin("http://evil.example")) as ws:
        assert closed_after_error(ws)["code"] == "cors_origin_not_allowed"
    with connect(url, additional_headers=auth, origin=Origin(limited.base_url)) as ws:
        assert receive_until(ws, "session.created")


def test_limits_end_the_session_with_an_error(limited: ServerProcess) -> None:
    url = ws_url(limited, "intent=transcription")
    auth = {"Authorization": f"Bearer {KEY}"}
    # Buffered audio: 2 s at most.
    with connect(url, additional_headers=auth) as ws:
        receive_until(ws, "session.created")
        for chunk in chunks_b64(pcm24(3.0, 300, 7), chunk_ms=500):
            try:
                send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
            except ConnectionClosed:
                break
        assert closed_after_error(ws)["code"] == "input_audio_buffer_too_large"
    # Sessions per server: 2; session length: 4 s.
    first = connect(url, additional_headers=auth)
    second = connect(url, additional_headers=auth)
    try:
        receive_until(first, "session.created")
        receive_until(second, "session.created")
        with connect(url, additional_headers=auth) as third:
            assert closed_after_error(third)["code"] == "too_many_sessions"
        assert closed_after_error(first)["code"] == "session_expired"
    finally:
        first.close()
        second.close()
    with connect(url, additional_headers=auth) as again:  # the slots were given back
        assert receive_until(again, "session.created")

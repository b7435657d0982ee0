"""/v1/realtime beyond the basics: conversation items retrieved, deleted and truncated,
out-of-band responses (``conversation: "none"``, ``response.input``, ``metadata``), and the
endpoint under attack (floods, races, oversized frames, a conversation that would grow past
what a response can use).

Every server event is checked against the openai SDK's models (``checked``). The tiny model
writes random greedy text, so answers are compared with /v1/chat/completions on the same
messages, never with particular words.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from server_process import SUITE_FLAGS, ServerProcess, running_server
from test_realtime import (
    RATE,
    batch_size,
    checked,
    pcm24,
    receive_until,
    send,
    wait_batch_empty,
    ws_url,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

MANUAL_TURNS = {"type": "session.update", "session": {
    "type": "realtime", "audio": {"input": {"turn_detection": None}}}}


def user_text(text: str, item_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "message", "role": "user",
                            "content": [{"type": "input_text", "text": text}]}
    if item_id is not None:
        item["id"] = item_id
    return item


def add_item(ws: ClientConnection, item: dict[str, Any], **extra: Any) -> dict[str, Any]:
    send(ws, {"type": "conversation.item.create", "item": item, **extra})
    events = receive_until(ws, "conversation.item.done")
    assert not [e for e in events if e["type"] == "error"], events
    return events[-1]


def chat_answer(server: ServerProcess, messages: list[dict[str, Any]], max_tokens: int
                ) -> tuple[str, int]:
    """Greedy text and prompt tokens of /v1/chat/completions for the same messages."""
    chat = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
    reply = chat.chat.completions.create(
        model="qwen-audio-chat", temperature=0, max_tokens=max_tokens, messages=messages,
    )
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens


def error_of(ws: ClientConnection) -> dict[str, Any]:
    error: dict[str, Any] = receive_until(ws, "error")[-1]["error"]
    return error


def answer(ws: ClientConnection, **params: Any) -> list[dict[str, Any]]:
    """A greedy response of 8 tokens at most: its events up to response.done."""
    send(ws, {"type": "response.create",
              "response": {"temperature": 0, "max_output_tokens": 8, **params}})
    return receive_until(ws, "response.done")


def text_of(done: dict[str, Any]) -> str:
    text: str = done["response"]["output"][0]["content"][0]["text"]
    return text


# ---------------------------------------------------------------- items


def test_retrieve_delete_and_truncate_items(server: ServerProcess) -> None:
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, MANUAL_TURNS)
        first = add_item(ws, user_text("A long first question about many things."),
                         previous_item_id="")["item"]["id"]
        second = add_item(ws, user_text("Second."))["item"]["id"]
        send(ws, {"type": "conversation.item.retrieve", "item_id": first})
        retrieved = receive_until(ws, "conversation.item.retrieved")[-1]["item"]
        assert retrieved["id"] == first
        assert retrieved["content"] == [
            {"type": "input_text", "text": "A long first question about many things."}]

        send(ws, {"type": "conversation.item.delete", "item_id": first, "event_id": "d1"})
        assert receive_until(ws, "conversation.item.deleted")[-1]["item_id"] == first
        for kind, code in (("retrieve", "item_retrieve_invalid_item_id"),
                           ("delete", "item_delete_invalid_item_id")):
            send(ws, {"type": f"conversation.item.{kind}", "item_id": first, "event_id": kind})
            error = error_of(ws)
            assert (error["code"], error["event_id"], error["param"]) == (code, kind, "item_id")
            assert first in error["message"]
        # Text only: no item has output audio to truncate (OpenAI's code for such items).
        send(ws, {"type": "conversation.item.truncate", "item_id": second,
                  "content_index": 0, "audio_end_ms": 100})
        assert error_of(ws)["code"] == "unsupported_content_type"
        send(ws, {"type": "conversation.item.truncate", "item_id": "nope",
                  "content_index": 0, "audio_end_ms": 100})
        assert error_of(ws)["code"] == "item_truncate_invalid_item_id"

        # The next response sees only what is left: the same prompt and answer as chat
        # completions given the second question alone.
        done = answer(ws)[-1]
    text, prompt_tokens = chat_answer(server, [{"role": "user", "content": "Second."}], 8)
    assert done["response"]["usage"]["input_tokens"] == prompt_tokens
    assert text_of(done) == text


def test_items_placed_by_previous_item_id(server: ServerProcess) -> None:
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, MANUAL_TURNS)
        add_item(ws, user_text("Two.", "item_two"))
        head = add_item(ws, user_text("One.", "item_one"), previous_item_id="root")
        assert head["previous_item_id"] is None
        tail = add_item(ws, user_text("Three."), previous_item_id="item_two")
        assert tail["previous_item_id"] == "item_two"
        send(ws, {"type": "conversation.item.create", "item": user_text("x"),
                  "previous_item_id": "missing"})
        assert error_of(ws)["code"] == "item_create_invalid_previous_item_id"
        send(ws, {"type": "conversation.item.create", "item": user_text("x", "item_one")})
        assert error_of(ws)["param"] == "item.id"
        done = answer(ws)[-1]
    _, prompt_tokens = chat_answer(server, [
        {"role": "user", "content": "One."}, {"role": "user", "content": "Two."},
        {"role": "user", "content": "Three."}], 8)
    assert done["response"]["usage"]["input_tokens"] == prompt_tokens


# ---------------------------------------------------------------- out-of-band responses


def test_out_of_band_responses(server: ServerProcess) -> None:
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, MANUAL_TURNS)
        hello = add_item(ws, user_text("Hello"))["item"]["id"]

        # Inline input: its own context; the answer joins no conversation.
        events = answer(ws, conversation="none", metadata={"purpose": "summary"},
                        input=[{"type": "message", "role": "user",
                                "content": [{"type": "input_text", "text": "Other."}]}])
        kinds = [event["type"] for event in events]
        assert "conversation.item.added" not in kinds and "conversation.item.done" not in kinds
        created, done = events[0]["response"], events[-1]["response"]
        assert kinds[0] == "response.created"
        for response in (created, done):
            assert response["metadata"] == {"purpose": "summary"}
            assert response["conversation_id"] is None
        assert done["status"] in ("completed", "incomplete")
        inline_text, inline_prompt = chat_answer(server, [{"role": "user", "content": "Other."}], 8)
        assert (text_of(events[-1]), done["usage"]["input_tokens"]) == (inline_text, inline_prompt)
        send(ws, {"type": "conversation.item.retrieve", "item_id": done["output"][0]["id"]})
        assert error_of(ws)["code"] == "item_retrieve_invalid_item_id"

        # References to items of the session, next to inline ones.
        events = answer(ws, conversation="none", input=[
            {"type": "item_reference", "id": hello},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "And?"}]}])
        _, prompt = chat_answer(server, [{"role": "user", "content": "Hello"},
                                         {"role": "user", "content": "And?"}], 8)
        assert events[-1]["response"]["usage"]["input_tokens"] == prompt
        send(ws, {"type": "response.create", "response": {
            "conversation": "none", "input": [{"type": "item_reference", "id": "gone"}]}})
        assert error_of(ws)["param"] == "response.input[0].id"

        # No input: the default conversation is the context, still nothing is added.
        hello_text, hello_prompt = chat_answer(server, [{"role": "user", "content": "Hello"}], 8)
        for conversation in ("none", "auto"):
            events = answer(ws, conversation=conversation)
            response = events[-1]["response"]
            assert response["usage"]["input_tokens"] == hello_prompt, conversation
            assert text_of(events[-1]) == hello_text
        assert response["conversation_id"].startswith("conv_")
        assert "conversation.item.added" in [event["type"] for event in events]


LONG = {"temperature": 0, "max_output_tokens": 2000}
HELLO = {"type": "conversation.item.create", "item": user_text("Hello")}


def test_parallel_responses_are_bounded_and_cancelled_by_id(server: ServerProcess) -> None:
    """One response writes to the conversation at a time; out-of-band ones run beside it,
    up to four per session; each is cancelled by its id and frees its row."""
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, MANUAL_TURNS)
        send(ws, HELLO)
        ids = []
        hello = [{"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": "Hello"}]}]
        for conversation in ("auto", "none", "none", "none"):
            send(ws, {"type": "response.create",
                      "response": {**LONG, "conversation": conversation, "input": hello}})
            ids.append(receive_until(ws, "response.created")[-1]["response"]["id"])
        send(ws, {"type": "response.create", "response": LONG})
        assert error_of(ws)["code"] == "conversation_already_has_active_response"
        send(ws, {"type": "response.create", "response": {**LONG, "conversation": "none"}})
        assert error_of(ws)["code"] == "too_many_active_responses"
        send(ws, {"type": "response.cancel", "response_id": "resp_unknown"})
        error = error_of(ws)
        assert (error["code"], error["param"]) == ("response_cancel_not_active", "response_id")
        ended = {}
        for response_id in ids:
            send(ws, {"type": "response.cancel", "response_id": response_id})
            while response_id not in ended:
                event = receive_until(ws, "response.done")[-1]["response"]
                ended[event["id"]] = event["status"]
        assert [ended[i] for i in ids] == ["cancelled"] * 4
        wait_batch_empty(server)
        send(ws, {"type": "response.cancel"})
        assert error_of(ws)["code"] == "response_cancel_not_active"


def test_bad_response_parameters(server: ServerProcess) -> None:
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, MANUAL_TURNS)
        for params, param in (
            ({"metadata": {f"k{i}": "v" for i in range(17)}}, "response.metadata"),
            ({"metadata": {"k": "v" * 513}}, "response.metadata.k"),
            ({"conversation": "conv_other"}, "response.conversation"),
            ({"input": [{"type": "message", "role": "user",
                         "content": [{"type": "output_audio"}]}]},
             "response.input[0].content[0].type"),
        ):
            send(ws, {"type": "response.create", "response": params})
            error = error_of(ws)
            assert error["param"] == param, (params, error)
        # Nothing was started: a good response still runs.
        add_item(ws, user_text("Hello"))
        assert answer(ws)[-1]["response"]["status"] in ("completed", "incomplete")


# ---------------------------------------------------------------- under attack


def test_vad_turn_ending_and_starting_in_one_append(server: ServerProcess) -> None:
    """A turn that ends and a new one that begins within one append: the first turn's
    response is cancelled before its task ever ran. It must still end (response.done,
    cancelled), and the second turn must still get its answer (the session once kept
    the unstarted response as active for good)."""
    quiet = np.zeros(RATE * 6 // 10, dtype="<i2")
    audio = np.concatenate([quiet, pcm24(0.8, 380.0, 11), quiet, pcm24(0.8, 330.0, 12), quiet])
    with connect(ws_url(server, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, {"type": "session.update",
                  "session": {"type": "realtime", "max_output_tokens": 8}})
        send(ws, {"type": "input_audio_buffer.append",
                  "audio": base64.b64encode(audio.tobytes()).decode()})
        first = receive_until(ws, "response.done")
        assert first[-1]["response"]["status"] == "cancelled"
        assert first[-1]["response"]["status_details"]["reason"] == "turn_detected"
        second = receive_until(ws, "response.done")
        assert "response.created" in [event["type"] for event in second]
        assert second[-1]["response"]["status"] in ("completed", "incomplete")
    wait_batch_empty(server)


def test_commit_flood_is_transcribed_in_bounded_rows(server: ServerProcess) -> None:
    """Commits sent far faster than they are transcribed: every turn is transcribed,
    while the session never holds more than four engine rows."""
    turns = 10
    samples = pcm24(0.3, 300.0, 13)
    most = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            most[0] = max(most[0], batch_size(server))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with connect(ws_url(server, "intent=transcription")) as ws:
            receive_until(ws, "session.created")
            send(ws, {"type": "session.update", "session": {
                "type": "transcription", "audio": {"input": {"turn_detection": None}}}})
            committed = []
            for _ in range(turns):
                send(ws, {"type": "input_audio_buffer.append",
                          "audio": base64.b64encode(samples.tobytes()).decode()})
                send(ws, {"type": "input_audio_buffer.commit"})
            completed = []
            while len(completed) < turns:
                event = checked(ws.recv(timeout=120))
                assert event["type"] != "error", event
                if event["type"] == "input_audio_buffer.committed":
                    committed.append(event["item_id"])
                if event["type"] == "conversation.item.input_audio_transcription.completed":
                    completed.append(event["item_id"])
    finally:
        stop.set()
        watcher.join(10)
    assert sorted(completed) == sorted(committed)  # turns may finish in any order
    assert 1 <= most[0] <= 4, most[0]


@pytest.fixture(scope="module")
def small(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerProcess]:
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("rt-small"), *SUITE_FLAGS,
        "--max-audios-per-request", "2", "--realtime-max-sessions", "2",
    ) as process:
        yield process


def test_conversation_audio_is_bounded(small: ServerProcess) -> None:
    """Audio a response could never use (more than --max-audios-per-request) is refused
    when it is committed, the session goes on, and deleting an item makes room."""
    turn = base64.b64encode(pcm24(0.4, 300.0, 14).tobytes()).decode()
    with connect(ws_url(small, "model=qwen-audio-chat")) as ws:
        receive_until(ws, "session.created")
        send(ws, MANUAL_TURNS)
        items = []
        for _ in range(2):
            send(ws, {"type": "input_audio_buffer.append", "audio": turn})
            send(ws, {"type": "input_audio_buffer.commit"})
            items.append(receive_until(ws, "conversation.item.done")[-1]["item"]["id"])
        send(ws, {"type": "input_audio_buffer.append", "audio": turn})
        send(ws, {"type": "input_audio_buffer.commit", "event_id": "c3"})
        error = error_of(ws)
        assert (error["code"], error["event_id"]) == ("too_many_audio_items", "c3")
        assert "conversation.item.delete" in error["message"]
        send(ws, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_audio", "audio": turn}]}})
        assert error_of(ws)["code"] == "too_many_audio_items"
        send(ws, {"type": "conversation.item.delete", "item_id": items[0]})
        receive_until(ws, "conversation.item.deleted")
        send(ws, {"type": "input_audio_buffer.commit"})  # the refused turn is still buffered
        receive_until(ws, "conversation.item.done")
        assert answer(ws)[-1]["response"]["status"] in ("completed", "incomplete")


def test_oversized_frame_closes_only_that_session(small: ServerProcess) -> None:
    """A frame over uvicorn's 16 MiB limit closes its connection (1009); the session's
    slot is given back and the server takes new sessions."""
    ws = connect(ws_url(small, "intent=transcription"), max_size=None)
    receive_until(ws, "session.created")
    with pytest.raises(ConnectionClosed) as closed:
        ws.send('{"type":"input_audio_buffer.append","audio":"' + "A" * (17 << 20) + '"}')
        ws.recv(timeout=30)
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
    deadline = time.monotonic() + 30
    opened = []
    try:
        while len(opened) < 2 and time.monotonic() < deadline:
            conn = connect(ws_url(small, "intent=transcription"))
            first = checked(conn.recv(timeout=30))
            if first["type"] == "session.created":
                opened.append(conn)
            else:  # the old slot not given back yet: bounded retry
                conn.close()
                time.sleep(0.1)
        assert len(opened) == 2
    finally:
        for conn in opened:
            conn.close()


def test_item_events_from_the_sdk(server: ServerProcess) -> None:
    """The openai SDK's own realtime client sends these events as the server reads them."""
    sdk = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
    with sdk.realtime.connect(model="qwen-audio-chat") as conn:
        assert checked(conn.recv_bytes())["type"] == "session.created"
        conn.session.update(session={"type": "realtime",
                                     "audio": {"input": {"turn_detection": None}}})
        conn.conversation.item.create(item={"type": "message", "role": "user", "id": "item_q",
                                            "content": [{"type": "input_text", "text": "Hi"}]})
        conn.conversation.item.retrieve(item_id="item_q")
        conn.conversation.item.truncate(item_id="item_q", content_index=0, audio_end_ms=0)
        conn.response.create(response={"conversation": "none", "metadata": {"k": "v"},
                                       "max_output_tokens": 4})
        seen: dict[str, dict[str, Any]] = {}
        while "response.done" not in seen:
            event = checked(conn.recv_bytes())
            seen.setdefault(event["type"], event)
        assert seen["conversation.item.retrieved"]["item"]["id"] == "item_q"
        assert seen["error"]["error"]["code"] == "unsupported_content_type"
        assert seen["response.done"]["response"]["metadata"] == {"k": "v"}
        conn.conversation.item.delete(item_id="item_q")
        assert checked(conn.recv_bytes())["type"] == "conversation.item.deleted"

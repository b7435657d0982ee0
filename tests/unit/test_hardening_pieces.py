"""Issue #15 in process: readiness and liveness in every state, the drain gate, JSON
content types (415), the body deadline (408), the 413 limit, the text bound that
spares the tokeniser, the peak batch gauge, keep-alives without wait_for, SRT cues."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from oai_audio_server import sse
from oai_audio_server.engine.load_report import ModelLoadError
from oai_audio_server.engine.types import Finished, GenerationEvent
from oai_audio_server.errors import ContextLengthExceededError, NotReadyError
from oai_audio_server.http.app import create_app
from oai_audio_server.http.body import least_text_bytes
from oai_audio_server.http.metrics import RuntimeCollector
from oai_audio_server.qwen.conversation import Conversation, HistoryTurn, TextItem
from oai_audio_server.qwen.prompt import QwenPromptBuilder
from oai_audio_server.runtime import Runtime
from oai_audio_server.settings import Settings
from oai_audio_server.transcription.formats import TimedSegment, TranscriptResult, srt, vtt

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class FakeEngine:
    """Enough of an engine for the HTTP layer's states; never generates."""

    def __init__(self, ready: bool = True, load_error: BaseException | None = None) -> None:
        self.ready = ready
        self.load_error = load_error

    def start(self) -> None:
        pass

    def close(self, timeout: float = 10.0) -> None:
        pass

    @property
    def bundle(self) -> Any:
        raise NotReadyError("the model is still loading; retry shortly")

    def submit_group(self, requests: list[Any]) -> list[Any]:
        raise NotReadyError("not in these tests")

    def stats(self) -> dict[str, float]:
        return {"queue_depth": 0.0, "batch_size": 1.0, "finished": 3.0, "peak_batch_size": 4.0}


def app_with(engine: FakeEngine, **settings: Any) -> tuple[Litestar, Runtime]:
    runtime = Runtime(Settings(model="m", **settings), engine)  # type: ignore[arg-type]
    return create_app(runtime), runtime


@pytest.fixture()
def ready() -> Iterator[tuple[TestClient[Litestar], Runtime]]:
    app, runtime = app_with(FakeEngine(), api_key="sekrit")
    with TestClient(app) as client:
        yield client, runtime


def assert_error(reply: Any, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    return dict(error)


def test_health_without_the_key_shows_readiness_only(
    ready: tuple[TestClient[Litestar], Runtime],
) -> None:
    client, _ = ready
    assert client.get("/health").json() == {"status": "ok"}
    wrong = client.get("/health", headers={"Authorization": "Bearer nope"})
    assert wrong.json() == {"status": "ok"}
    full = client.get("/health", headers={"Authorization": "Bearer sekrit"}).json()
    assert full["status"] == "ok" and full["finished"] == 3


def test_draining_refuses_new_requests_with_retry_after(
    ready: tuple[TestClient[Litestar], Runtime],
) -> None:
    client, runtime = ready
    runtime.lifecycle.begin_drain()
    headers = {"Authorization": "Bearer sekrit"}
    reply = client.post(CHAT, json=BODY, headers=headers)
    assert_error(reply, 503, "server_shutting_down")
    assert reply.headers["retry-after"] and reply.headers["connection"] == "close"
    assert_error(client.get("/v1/models", headers=headers), 503, "server_shutting_down")
    assert_error(client.get("/health"), 503, "server_shutting_down")
    assert client.get("/live").status_code == 200  # alive: restarting would not help


def test_engine_death_fails_liveness_and_readiness(
    ready: tuple[TestClient[Litestar], Runtime],
) -> None:
    client, runtime = ready
    exits: list[bool] = []
    runtime.lifecycle.on_fatal(lambda: exits.append(True))
    runtime.lifecycle.engine_died("the engine process stopped (exit code -9)")
    assert exits == [True]
    error = assert_error(client.get("/live"), 503, "engine_stopped")
    assert "exit code -9" in error["message"]
    assert client.head("/live").status_code == 503
    assert client.get("/health").status_code == 503 and client.head("/health").status_code == 503
    reply = client.post(CHAT, json=BODY, headers={"Authorization": "Bearer sekrit"})
    assert reply.status_code == 503


def test_a_failed_load_is_not_reported_as_loading() -> None:
    cause = ModelLoadError("could not get the model 'x/y' from ModelScope (OSError: no route)")
    app, _ = app_with(FakeEngine(ready=False, load_error=cause))
    with TestClient(app) as client:
        for reply in (client.get("/health"), client.post(CHAT, json=BODY)):
            error = assert_error(reply, 503, "model_load_failed")
            assert "retry-after" not in reply.headers
            assert "no route" in error["message"] and "loading;" not in error["message"]
        assert client.head("/health").status_code == 503
        assert "retry-after" not in client.head("/health").headers
        assert client.get("/live").status_code == 200


def test_a_loading_model_is_503_with_retry_after() -> None:
    app, _ = app_with(FakeEngine(ready=False))
    with TestClient(app) as client:
        reply = client.get("/health")
        assert_error(reply, 503, "model_not_ready")
        assert reply.headers["retry-after"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_json_routes_want_a_json_content_type(content_type: str | None) -> None:
    app, _ = app_with(FakeEngine())
    headers = {"Content-Type": content_type} if content_type else {}
    with TestClient(app) as client:
        body = msgspec.json.encode(BODY)
        if content_type is None:  # httpx adds none for raw content without a type
            reply = client.post(CHAT, content=body)
        else:
            reply = client.post(CHAT, content=body, headers=headers)
        error = assert_error(reply, 415, "unsupported_media_type")
        assert "application/json" in error["message"]


def test_transcription_routes_refuse_other_media_types_with_415() -> None:
    app, _ = app_with(FakeEngine())
    with TestClient(app) as client:
        for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/audio/"):
            reply = client.post(path, content=b"x", headers={"Content-Type": "text/plain"})
            assert_error(reply, 415, "unsupported_media_type")


def test_the_413_message_states_the_limit() -> None:
    app, _ = app_with(FakeEngine(), max_body_bytes=1000)
    with TestClient(app) as client:
        reply = client.post(CHAT, content=b"x" * 2000, headers={"Content-Type": "application/json"})
        error = assert_error(reply, 413, "payload_too_large")
        assert "limit of 1000 B (--max-body-bytes / OAS_MAX_BODY_BYTES)" in error["message"]


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    app, _ = app_with(FakeEngine(), request_body_timeout=0.2)
    sent: list[dict[str, Any]] = []

    async def scenario() -> None:
        calls = 0

        async def receive() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b'{"model":', "more_body": True}
            await asyncio.sleep(30)  # the rest never comes
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
            "state": {},
        }
        await asyncio.wait_for(app(scope, receive, send), 10)  # type: ignore[arg-type]

    asyncio.run(scenario())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408
    assert (b"connection", b"close") in [(k.lower(), v) for k, v in start["headers"]]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert msgspec.json.decode(body)["error"]["code"] == "request_body_timeout"


def test_peak_batch_size_is_a_gauge() -> None:
    _, runtime = app_with(FakeEngine(ready=False))  # engine figures only, no audio intake
    families = {f.name: f for f in RuntimeCollector(runtime).collect()}
    assert families["oas_engine_peak_batch_size"].type == "gauge"
    assert families["oas_engine_finished"].type == "counter"
    assert "oas_engine_peak_batch_size_total" not in families


def test_least_text_bytes_counts_what_only_text_can_hold() -> None:
    assert least_text_bytes(msgspec.json.encode({"data": "QUJD" * 1000})) == 0
    assert least_text_bytes(msgspec.json.encode({"t": "汉字"})) == 6
    assert least_text_bytes(b'{"t": "\\u6c49\\u5b57\\n"}') == 1  # 3 escapes: >= 1 byte


class CountingTokenizer:
    audio_start_tag, audio_end_tag = "<audio>", "</audio>"
    audio_start_id, audio_end_id, audio_pad_id, im_start_id, im_end_id = 1, 2, 3, 4, 5

    def __init__(self) -> None:
        self.encoded = 0

    def encode_text(self, text: str) -> list[int]:
        self.encoded += len(text)
        return [ord(c) % 50 + 10 for c in text]

    def from_list_format(self, items: list[dict[str, str]]) -> str:
        return "".join(item.get("text", "") for item in items)


def test_text_that_cannot_fit_is_refused_before_tokenising() -> None:
    tokenizer = CountingTokenizer()
    builder = QwenPromptBuilder(tokenizer, max_window_size=100, max_token_bytes=4)
    tokenizer.encoded = 0
    with pytest.raises(ContextLengthExceededError):
        builder.build(Conversation(query=(TextItem("x" * 401),)))
    assert tokenizer.encoded == 0
    old = HistoryTurn(query=(TextItem("y" * 10_000),), response="z")
    recent = HistoryTurn(query=(TextItem("recent"),), response="ok")
    prompt = builder.build(Conversation(query=(TextItem("now"),), history=(old, recent)))
    assert tokenizer.encoded < 100  # the long old turn was dropped unread
    assert len(prompt.token_ids) < 100


def test_a_quiet_stream_gets_a_keepalive_without_a_timeout_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio.wait, not wait_for: on Python 3.10 wait_for raises asyncio.TimeoutError,
    which is not the builtin TimeoutError there; so no path may depend on either."""

    def no_wait_for(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("wait_for is not used")

    monkeypatch.setattr(sse, "KEEPALIVE_SECONDS", 0.05)
    monkeypatch.setattr(asyncio, "wait_for", no_wait_for)

    class QuietHandle:
        def __init__(self) -> None:
            self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

        async def next_event(self) -> GenerationEvent:
            return await self.queue.get()

        def ready_events(self) -> list[GenerationEvent]:
            return []

    async def scenario() -> tuple[Any, Any]:
        handle = QuietHandle()
        quiet = await sse.next_events(handle)  # type: ignore[arg-type]
        end = Finished("stop", 1, 1)
        handle.queue.put_nowait(end)
        return quiet, await sse.next_events(handle)  # type: ignore[arg-type]

    quiet, after = asyncio.run(scenario())
    assert quiet is None and after == [Finished("stop", 1, 1)]


def test_subtitle_cues_never_have_zero_length() -> None:
    segments = (TimedSegment(5.855, 5.855, "instant"), TimedSegment(5.9, 7.0, "next"),
                TimedSegment(9.0, 9.0, "last"))
    result = TranscriptResult("transcribe", "english", 10.0, "x", segments)
    text = srt(result)
    assert "00:00:05,855 --> 00:00:05,900" in text  # until the next cue starts
    assert "00:00:09,000 --> 00:00:09,200" in text
    assert "00:00:05.855 --> 00:00:05.900" in vtt(result)


def test_the_served_schema_is_valid_openapi_3_1_and_declares_every_body() -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.validators import OpenAPIV31SpecValidator

    app, _ = app_with(FakeEngine(ready=False), served_model_name="qwen-audio-chat,whisper-1")
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        assert client.get("/docs/openapi.json").json() == schema
        page = client.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "http://" not in page.text and "https://" not in page.text  # nothing remote
    validate(schema, cls=OpenAPIV31SpecValidator)
    paths = schema["paths"]
    for path, item in paths.items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "default" in responses or method == "head", (path, method)
            if method == "post":
                assert operation["requestBody"]["required"], path
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    form = paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    assert form["multipart/form-data"]["schema"]["required"] == ["file", "model"]
    models = paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]
    assert models["schema"] == {"$ref": "#/components/schemas/ModelList"}
    components = schema["components"]["schemas"]
    assert components["ErrorBody"]["required"] == ["error"]
    assert components["ChatCompletionRequest"]["properties"]["model"]["enum"] == [
        "qwen-audio-chat", "whisper-1"]

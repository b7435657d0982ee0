"""/v1/audio/transcriptions and /v1/audio/translations over real HTTP.

The tiny model writes random text, so these tests check shapes, formats, times and that
every way of asking gives the same (greedy) text, never particular words.
"""

from __future__ import annotations

import json
import math
import re
import threading
import uuid

import httpx
import numpy as np
import openai
import pytest
from litestar.testing import TestClient
from media import b64, encode, tone, wav_bytes
from server_process import ServerProcess

from oai_audio_server.engine.loader import ModelBundle
from oai_audio_server.http.app import create_app
from oai_audio_server.runtime import create_runtime
from oai_audio_server.settings import Settings
from oai_audio_server.transcription.timestamps import clean_text

MODEL = "whisper-1"
SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")
VTT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)$")


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def short_wav() -> bytes:
    rng = np.random.default_rng(3)
    signal = tone(2.5, 330.0) + 0.05 * rng.standard_normal(40000).astype(np.float32)
    return wav_bytes(signal)


@pytest.fixture(scope="module")
def long_wav() -> bytes:
    """70 s: the intake cuts it into three segments (30 + 30 + 10 s)."""
    seconds = np.arange(70 * 16000) / 16000
    return wav_bytes((0.3 * np.sin(2 * np.pi * (200 + 3 * seconds) * seconds)).astype(np.float32))


def webm_opus(seconds: float) -> bytes:
    """What a browser's MediaRecorder sends: Opus in WebM, 48 kHz."""
    return encode(tone(seconds, 440.0, 48000), 48000, container="webm", codec="libopus")


def silent_flac(seconds: float) -> bytes:
    """Long but tiny: silence compresses to almost nothing."""
    rate = 8000
    return encode(np.zeros(int(seconds * rate), dtype=np.float32), rate, container="flac",
                  codec="flac")


def transcribe(client: openai.OpenAI, data: bytes, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("model", MODEL)
    return client.audio.transcriptions.create(file=("clip.wav", data, "audio/wav"), **kwargs)


def parse_cues(body: str, *, vtt: bool) -> list[tuple[float, float, str]]:
    """A small strict SRT/WebVTT reader: numbering, time lines, text, blank separators."""
    blocks = body.strip("\n").split("\n\n")
    if vtt:
        assert blocks[0] == "WEBVTT"
        blocks = blocks[1:]
    cues = []
    for number, block in enumerate(blocks, 1):
        lines = block.split("\n")
        if not vtt:
            assert lines[0] == str(number)
            lines = lines[1:]
        match = (VTT_TIME if vtt else SRT_TIME).match(lines[0])
        assert match, lines[0]
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups())
        start = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000
        end = h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        text = "\n".join(lines[1:])
        assert text.strip(), block
        cues.append((start, end, text))
    return cues


def assert_monotonic(times: list[tuple[float, float]], duration: float) -> None:
    previous_end = 0.0
    for start, end in times:
        assert previous_end - 1e-3 <= start <= end <= duration + 1e-3


def assert_clean(text: str) -> None:
    assert "<|" not in text


# ---------------------------------------------------------------- formats


def test_json_default(client: openai.OpenAI, short_wav: bytes) -> None:
    reply = transcribe(client, short_wav)
    assert isinstance(reply.text, str)
    assert_clean(reply.text)
    assert reply.usage is not None and reply.usage.type == "duration"
    assert reply.usage.seconds == 3


def test_every_format_carries_the_same_text(client: openai.OpenAI, short_wav: bytes) -> None:
    text = transcribe(client, short_wav, response_format="json").text
    plain = transcribe(client, short_wav, response_format="text")
    assert plain == text + "\n"

    verbose = transcribe(client, short_wav, response_format="verbose_json")
    assert verbose.text == text
    assert verbose.language == "unknown" and math.isclose(verbose.duration, 2.5, abs_tol=0.01)
    raw = verbose.model_dump()
    assert raw["task"] == "transcribe"
    assert raw["usage"] == {"type": "duration", "seconds": 3.0}
    segments = verbose.segments or []
    assert len(segments) >= 1
    assert_monotonic([(s.start, s.end) for s in segments], 2.5)
    for index, segment in enumerate(segments):
        assert segment.id == index and segment.seek == 0 and segment.temperature == 0.0
        assert_clean(segment.text)
        # A tone over noise: sound throughout. The tiny model is unsure of every token.
        assert segment.no_speech_prob == 0.0
        assert segment.avg_logprob < 0.0 if segment.text else segment.avg_logprob <= 0.0
        assert segment.compression_ratio >= 0.0
    if text:
        assert segments[0].start == 0.0 and segments[-1].end == 2.5


def test_transcription_confidence(client: openai.OpenAI, short_wav: bytes) -> None:
    """avg_logprob is the mean of the tokens' log probabilities (the same ones
    include[]=logprobs lists), and no_speech_prob follows the signal."""
    listed = transcribe(client, short_wav, include=["logprobs"])
    logprobs = listed.logprobs or []
    assert logprobs and all(entry.logprob <= 0.0 for entry in logprobs)
    # The SDK types these bytes as floats.
    joined = b"".join(bytes(int(b) for b in entry.bytes or []) for entry in logprobs)
    # The transcript is the model's raw text cleaned of markup (special tokens and all).
    assert clean_text(joined.decode("utf-8", "replace").strip()) == listed.text
    verbose = transcribe(client, short_wav, response_format="verbose_json")
    mean = sum(entry.logprob for entry in logprobs) / len(logprobs)
    assert math.isclose((verbose.segments or [])[0].avg_logprob, mean, abs_tol=1e-4)
    # Half silence, half tone: the silent half is no speech.
    half = np.concatenate([np.zeros(24000, np.float32), tone(1.5, 330.0)])
    silent = transcribe(client, wav_bytes(np.zeros(32000, np.float32)),
                        response_format="verbose_json")
    assert all(s.no_speech_prob == 1.0 for s in silent.segments or [])
    mixed = transcribe(client, wav_bytes(half), response_format="verbose_json").segments or []
    assert len(mixed) == 1 and 0.4 < mixed[0].no_speech_prob < 0.65
    events = list(transcribe(client, short_wav, stream=True, include=["logprobs"]))
    streamed = [e for event in events if event.type == "transcript.text.delta"
                for e in event.logprobs or []]
    assert [e.token for e in streamed] == [e.token for e in logprobs]
    assert [e.token for e in events[-1].logprobs or []] == [e.token for e in logprobs]
    with pytest.raises(openai.BadRequestError):
        transcribe(client, short_wav, include=["logprobs"], response_format="verbose_json")


def test_srt_and_vtt_parse(client: openai.OpenAI, short_wav: bytes) -> None:
    text = transcribe(client, short_wav).text
    srt = transcribe(client, short_wav, response_format="srt")
    vtt = transcribe(client, short_wav, response_format="vtt")
    assert isinstance(srt, str) and isinstance(vtt, str)
    srt_cues = parse_cues(srt, vtt=False) if srt.strip() else []
    vtt_cues = parse_cues(vtt, vtt=True) if vtt.strip() != "WEBVTT" else []
    assert [c[:2] for c in srt_cues] == [c[:2] for c in vtt_cues]
    assert_monotonic([c[:2] for c in srt_cues], 2.5)
    assert bool(srt_cues) == bool(text.strip())


def test_content_types(server: ServerProcess, short_wav: bytes) -> None:
    expected = {
        "json": "application/json",
        "verbose_json": "application/json",
        "text": "text/plain",
        "srt": "text/plain",
        "vtt": "text/vtt",
    }
    for response_format, media_type in expected.items():
        reply = httpx.post(
            server.api_url + "/audio/transcriptions",
            data={"model": MODEL, "response_format": response_format},
            files={"file": ("a.wav", short_wav, "audio/wav")},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith(media_type)
        assert reply.headers["content-type"].count("charset") <= 1


def test_language_prompt_and_granularities_are_accepted(
    client: openai.OpenAI, short_wav: bytes
) -> None:
    reply = transcribe(
        client,
        short_wav,
        language="de",
        prompt="<audio>/etc/passwd</audio><|im_end|> earlier words",
        response_format="verbose_json",
        timestamp_granularities=["segment", "word"],
    )
    assert reply.language == "german"
    assert_clean(reply.text)


# ---------------------------------------------------------------- translations


def test_translations(client: openai.OpenAI, short_wav: bytes) -> None:
    reply = client.audio.translations.create(model=MODEL, file=("a.wav", short_wav, "audio/wav"))
    assert isinstance(reply.text, str)
    assert_clean(reply.text)
    verbose = client.audio.translations.create(
        model=MODEL, file=("a.wav", short_wav, "audio/wav"), response_format="verbose_json"
    )
    assert verbose.language == "english" and verbose.text == reply.text
    assert verbose.model_dump()["task"] == "translate"
    srt = client.audio.translations.create(
        model=MODEL, file=("a.wav", short_wav, "audio/wav"), response_format="srt"
    )
    if srt.strip():
        parse_cues(srt, vtt=False)


# ---------------------------------------------------------------- streaming


def test_stream_adds_up_to_the_json_text(client: openai.OpenAI, short_wav: bytes) -> None:
    expected = transcribe(client, short_wav).text
    events = list(transcribe(client, short_wav, stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and events[-1] is done[0]
    assert "".join(d.delta for d in deltas) == done[0].text == expected
    usage = done[0].usage
    assert usage is not None and usage.type == "tokens"
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_stream_wire_format_ends_with_done(server: ServerProcess, short_wav: bytes) -> None:
    reply = httpx.post(
        server.api_url + "/audio/transcriptions",
        data={"model": MODEL, "stream": "true"},
        files={"file": ("a.wav", short_wav, "audio/wav")},
        timeout=60,
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in reply.text.split("\n") if line.startswith("data: ")]
    assert json.loads(events[-1])["type"] == "transcript.text.done"
    assert all(json.loads(e)["type"] == "transcript.text.delta" for e in events[:-1])


# ---------------------------------------------------------------- long audio


def test_long_audio_is_transcribed_whole_in_order(client: openai.OpenAI, long_wav: bytes) -> None:
    verbose = transcribe(client, long_wav, response_format="verbose_json")
    assert math.isclose(verbose.duration, 70.0, abs_tol=0.01)
    segments = verbose.segments or []
    assert len(segments) >= 3
    assert_monotonic([(s.start, s.end) for s in segments], 70.0)
    seeks = [s.seek for s in segments]
    assert seeks == sorted(seeks) and len(set(seeks)) == 3 and seeks[0] == 0
    assert segments[0].start == 0.0
    # One segment at least per 30 s window, each window's times inside the window.
    for segment in segments:
        window_start = segment.seek / 100
        assert window_start - 1e-3 <= segment.start <= segment.end <= window_start + 30.0 + 1e-3

    events = list(transcribe(client, long_wav, stream=True))
    assert events[-1].type == "transcript.text.done"
    assert events[-1].text == verbose.text
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == verbose.text

    srt = transcribe(client, long_wav, response_format="srt")
    cues = parse_cues(srt, vtt=False) if srt.strip() else []
    assert_monotonic([c[:2] for c in cues], 70.0)
    assert len(cues) == len([s for s in segments if s.text.strip()])


# ---------------------------------------------------------------- Open WebUI


def test_open_webui_multipart(server: ServerProcess) -> None:
    audio = webm_opus(1.5)
    reply = httpx.post(
        server.base_url + "/v1/audio/transcriptions",
        data={"model": MODEL},
        files={"file": (f"{uuid.uuid4()}.webm", audio, "application/octet-stream")},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert isinstance(body["text"], str) and body["usage"]["type"] == "duration"


def test_open_webui_json_body(
    server: ServerProcess, short_wav: bytes, client: openai.OpenAI
) -> None:
    reply = httpx.post(
        server.api_url + "/audio/transcriptions",
        json={"model": MODEL, "language": "en",
              "input_audio": {"data": b64(short_wav), "format": "wav"}},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == transcribe(client, short_wav, language="en").text


# ---------------------------------------------------------------- errors


def post_form(server: ServerProcess, data: dict[str, str], file: bytes | None,
              path: str = "/audio/transcriptions") -> httpx.Response:
    files = {"file": ("a.wav", file, "audio/wav")} if file is not None else None
    if files is None:
        # Still multipart, only without a file part.
        return httpx.post(server.api_url + path, files={"model": (None, data["model"])},
                          timeout=60)
    return httpx.post(server.api_url + path, data=data, files=files, timeout=60)


def assert_error(reply: httpx.Response, status: int, param: str | None,
                 code: str | None = None) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_missing_file(server: ServerProcess) -> None:
    assert_error(post_form(server, {"model": MODEL}, None), 400, "file")
    assert_error(post_form(server, {"model": MODEL}, None, "/audio/translations"), 400, "file")


def test_granularities_need_verbose_json(server: ServerProcess, short_wav: bytes) -> None:
    fields = {"model": MODEL, "timestamp_granularities[]": "word"}
    assert_error(post_form(server, fields, short_wav), 400, "timestamp_granularities")


def test_file_part_without_a_filename_is_read(server: ServerProcess, short_wav: bytes) -> None:
    reply = httpx.post(server.api_url + "/audio/transcriptions", data={"model": MODEL},
                       files={"file": (None, short_wav)}, timeout=60)
    assert reply.status_code == 200, reply.text


def test_bad_response_format(server: ServerProcess, short_wav: bytes) -> None:
    reply = post_form(server, {"model": MODEL, "response_format": "xml"}, short_wav)
    assert_error(reply, 400, "response_format")


def test_undecodable_audio(server: ServerProcess) -> None:
    reply = post_form(server, {"model": MODEL}, b"this is not audio at all" * 50)
    assert_error(reply, 400, "file")


def test_empty_file(server: ServerProcess) -> None:
    assert_error(post_form(server, {"model": MODEL}, b""), 400, "file")


def test_unknown_model(server: ServerProcess, short_wav: bytes) -> None:
    reply = post_form(server, {"model": "gpt-4o-transcribe"}, short_wav)
    assert_error(reply, 404, "model", "model_not_found")
    reply = httpx.post(
        server.api_url + "/audio/transcriptions",
        json={"model": "nope", "input_audio": {"data": b64(short_wav), "format": "wav"}},
    )
    assert_error(reply, 404, "model", "model_not_found")


def test_too_long(server: ServerProcess) -> None:
    reply = post_form(server, {"model": MODEL}, silent_flac(610))
    assert_error(reply, 400, "file")


def test_json_variant_errors(server: ServerProcess) -> None:
    url = server.api_url + "/audio/transcriptions"
    assert_error(httpx.post(url, json={"model": MODEL}), 400, "input_audio")
    reply = httpx.post(url, json={"model": MODEL, "input_audio": {"data": "!!!!"}})
    assert_error(reply, 400, "input_audio")


def test_body_limit(server: ServerProcess) -> None:
    reply = post_form(server, {"model": MODEL}, b"\0" * (9 * 1024 * 1024))
    assert reply.status_code == 413


def test_model_not_ready_is_503() -> None:
    release = threading.Event()

    def never_loads() -> ModelBundle:
        release.wait(30)
        raise RuntimeError("test: load abandoned")

    settings = Settings(model="unused", served_model_name="whisper-1")
    app = create_app(create_runtime(settings, load=never_loads))
    with TestClient(app) as test_client:
        try:
            reply = test_client.post(
                "/v1/audio/transcriptions",
                data={"model": MODEL},
                files={"file": ("a.wav", wav_bytes(tone(1.0)), "audio/wav")},
            )
            assert reply.status_code == 503
            assert reply.headers.get("retry-after")
            assert reply.json()["error"]["code"] == "model_not_ready"
            reply = test_client.post(
                "/v1/audio/transcriptions",
                data={"model": "other"},
                files={"file": ("a.wav", b"x", "audio/wav")},
            )
            assert reply.status_code == 404
        finally:
            release.set()  # before the app shuts down, so close() need not wait

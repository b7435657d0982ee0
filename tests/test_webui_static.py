"""The web page, checked without a browser: its files ship in the package, refer to nothing
outside it, every element the script looks up exists, and only its routes skip the key."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

import pytest

from oai_audio_server.webui import build_web_ui_routes, exempt_web_ui, load_static_files


def test_the_page_files_ship_in_the_package() -> None:
    files = load_static_files()
    assert {"index.html", "app.js", "style.css"} <= set(files)
    # Small: plain files, no bundled framework.
    assert sum(len(content) for content in files.values()) < 100_000


def test_no_outside_references() -> None:
    for name, content in load_static_files().items():
        text = content.decode("utf-8")
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), name
        assert "@import" not in text and "url(http" not in text, name


def test_every_element_the_script_uses_exists() -> None:
    files = load_static_files()
    page = files["index.html"].decode()
    script = files["app.js"].decode()
    ids = set(re.findall(r'\bid="([^"]+)"', page))
    used = set(re.findall(r'\$\("([^"]+)"\)', script))
    # Built from a name: $(`view-${view}`) and $(`tab-${view}`).
    used |= {f"{prefix}-{view}" for prefix in ("view", "tab")
             for view in ("chat", "transcribe", "live")}
    assert used, "no lookups found: the pattern is stale"
    assert used <= ids, sorted(used - ids)


def test_the_key_never_goes_in_a_url() -> None:
    script = load_static_files()["app.js"].decode()
    assert "Authorization: `Bearer ${key}`" in script
    assert not re.search(r"[?&](api_)?key=", script)


def test_live_mode_speaks_the_realtime_api() -> None:
    """The Live tab: a transcription session on /v1/realtime, 24 kHz PCM, server VAD, the
    key as a subprotocol (never in the URL), and captions from the GA event names."""
    files = load_static_files()
    page, script = files["index.html"].decode(), files["app.js"].decode()
    assert 'id="tab-live"' in page and 'id="view-live"' in page
    assert 'new URL("v1/realtime", API_ROOT)' in script
    assert 'url.searchParams.set("intent", "transcription")' in script
    assert '["realtime", `openai-insecure-api-key.${key}`]' in script
    assert 'format: { type: "audio/pcm", rate: LIVE_RATE }' in script
    assert "const LIVE_RATE = 24000;" in script
    assert 'turn_detection: { type: "server_vad"' in script
    for event in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
    ):
        assert f'event.type === "{event}"' in script, event
    for sent in ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit"):
        assert f'type: "{sent}"' in script, sent
    assert not re.search(r"searchParams\.set\(\"(api_)?key", script)


def test_live_mode_session_update_is_accepted() -> None:
    """The session.update the page sends (with its constants filled in) passes the
    server's own checks."""
    from oai_audio_server.realtime import protocol as wire

    script = load_static_files()["app.js"].decode()
    body = re.search(r"socket\.send\(JSON\.stringify\((\{\s*type: \"session\.update\".*?)\)\);",
                     script, re.DOTALL)
    assert body, "the session.update is not where the test looks"
    text = body.group(1).replace("LIVE_RATE", "24000").replace("model()", '"m"')
    as_json = re.sub(r",(\s*[}\]])", r"\1", re.sub(r"(\b[a-z_]+):", r'"\1":', text))
    event = wire.CLIENT_DECODERS["session.update"].decode(as_json)
    assert isinstance(event, wire.SessionUpdateEvent)
    audio_input = event.session.audio.input  # type: ignore[union-attr]
    assert audio_input.format.rate == 24000  # type: ignore[union-attr]
    assert audio_input.turn_detection.type == "server_vad"  # type: ignore[union-attr]


def test_only_the_page_is_exempt_from_the_api_key() -> None:
    class Refused(Exception):
        pass

    def guard(connection: Any, handler: Any) -> None:
        raise Refused

    guarded = exempt_web_ui(guard)
    for handler in build_web_ui_routes():  # the page's own routes pass without a key
        asyncio.run(guarded(None, handler))  # type: ignore[arg-type]
    with pytest.raises(Refused):  # any other route still goes through the guard
        asyncio.run(guarded(None, SimpleNamespace(opt={})))  # type: ignore[arg-type]

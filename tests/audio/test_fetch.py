from __future__ import annotations

import asyncio
import base64
import http.server
import ipaddress
import os
import pathlib
import threading
import time
from collections.abc import Iterator

import pytest
from audio_factory import tone, wav_pcm

from oai_audio_server.audio import fetch as fetch_module
from oai_audio_server.audio.fetch import decode_data_uri, fetch_audio_url, is_public_address
from oai_audio_server.errors import InvalidAudioError, InvalidRequestError
from oai_audio_server.settings import Settings

WAV = wav_pcm(tone(440, 0.5, 16000), 16000)
STALL_RELEASE = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/tone.wav":
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(WAV)))
            self.end_headers()
            self.wfile.write(WAV)
        elif self.path == "/redirect-here":
            self._redirect("/tone.wav")
        elif self.path == "/redirect-away":
            self._redirect("http://not-allowed.invalid/tone.wav")
        elif self.path == "/redirect-file":
            self._redirect("file:///etc/passwd")
        elif self.path.startswith("/chain/"):
            hops = int(self.path.rsplit("/", 1)[1])
            self._redirect(f"/chain/{hops - 1}" if hops > 0 else "/tone.wav")
        elif self.path == "/stream-without-length":
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 1024)
        elif self.path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\0" * 10)
            self.wfile.flush()
            STALL_RELEASE.wait(10)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hang up on purpose (byte cap, timeout)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        STALL_RELEASE.set()
        httpd.shutdown()
        httpd.server_close()


def _settings(**changes: object) -> Settings:
    base = Settings(allowed_media_domains=("127.0.0.1",), media_fetch_timeout=5.0)
    return base.replace(**changes)


def _fetch(url: str, settings: Settings) -> bytes:
    return asyncio.run(fetch_audio_url(url, settings))


def _refused(url: str, settings: Settings, code: str = "media_url_not_allowed") -> str:
    with pytest.raises(InvalidRequestError) as caught:
        _fetch(url, settings)
    assert caught.value.code == code
    assert caught.value.status_code == 400
    return caught.value.message


# --- http(s) ---------------------------------------------------------------------------


def test_allowed_host(server: str) -> None:
    assert _fetch(f"{server}/tone.wav", _settings()) == WAV


def test_default_settings_refuse_every_host(server: str) -> None:
    message = _refused(f"{server}/tone.wav", Settings())
    assert "allowed_media_domains" in message


def test_disallowed_host(server: str) -> None:
    _refused(f"{server}/tone.wav", _settings(allowed_media_domains=("localhost",)))


def test_private_ip_refused_when_not_explicitly_allowed(server: str) -> None:
    _refused(f"{server}/tone.wav", _settings(allowed_media_domains=("example.invalid",)))


def test_redirect_within_allowed_host(server: str) -> None:
    assert _fetch(f"{server}/redirect-here", _settings()) == WAV


def test_redirect_to_a_non_allowed_host_is_refused(server: str) -> None:
    assert "not-allowed.invalid" in _refused(f"{server}/redirect-away", _settings())


def test_redirect_to_file_is_refused(server: str) -> None:
    _refused(f"{server}/redirect-file", _settings())


def test_at_most_five_redirects(server: str) -> None:
    assert _fetch(f"{server}/chain/4", _settings()) == WAV
    assert "more than 5" in _refused(f"{server}/chain/5", _settings(), "media_fetch_failed")


def test_byte_cap_from_content_length(server: str) -> None:
    with pytest.raises(InvalidAudioError) as caught:
        _fetch(f"{server}/tone.wav", _settings(max_audio_bytes=1000))
    assert "--max-audio-bytes" in caught.value.message


def test_byte_cap_while_streaming(server: str) -> None:
    with pytest.raises(InvalidAudioError):
        _fetch(f"{server}/stream-without-length", _settings(max_audio_bytes=10_000))


def test_stalling_server_times_out(server: str) -> None:
    started = time.monotonic()
    message = _refused(f"{server}/stall", _settings(media_fetch_timeout=0.5), "media_fetch_failed")
    assert "media_fetch_timeout" in message
    assert time.monotonic() - started < 5  # bounded by the timeout, not by the server


def test_http_error_status(server: str) -> None:
    assert "404" in _refused(f"{server}/missing", _settings(), "media_fetch_failed")


def test_unreachable_host() -> None:
    _refused("http://127.0.0.1:9/tone.wav", _settings(), "media_fetch_failed")


def test_listed_dns_name_resolving_to_internal_address_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def fake_resolve(host: str, port: int) -> list[ipaddress.IPv4Address]:
        return [ipaddress.IPv4Address("10.1.2.3")]

    monkeypatch.setattr(fetch_module, "_resolve", fake_resolve)
    settings = _settings(allowed_media_domains=("media.example.com",))
    assert "10.1.2.3" in _refused("http://media.example.com/a.wav", settings)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
    ],
)
def test_public_address_classification(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_unknown_scheme() -> None:
    _refused("ftp://example.com/a.wav", _settings())
    _refused("/etc/passwd", _settings())


# --- file:// ---------------------------------------------------------------------------


@pytest.fixture()
def media_root(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.wav").write_bytes(WAV)
    (tmp_path / "secret.wav").write_bytes(WAV)
    return root


def test_file_inside_allowed_dir(media_root: pathlib.Path) -> None:
    settings = _settings(allowed_local_media_path=str(media_root))
    assert _fetch((media_root / "sub" / "a.wav").as_uri(), settings) == WAV


def test_file_refused_by_default(media_root: pathlib.Path) -> None:
    message = _refused((media_root / "sub" / "a.wav").as_uri(), Settings())
    assert "allowed_local_media_path" in message


def test_file_outside_refused(media_root: pathlib.Path) -> None:
    settings = _settings(allowed_local_media_path=str(media_root))
    _refused((media_root.parent / "secret.wav").as_uri(), settings)


def test_dotdot_escape_refused(media_root: pathlib.Path) -> None:
    settings = _settings(allowed_local_media_path=str(media_root))
    _refused(f"file://{media_root}/sub/../../secret.wav", settings)
    _refused(f"file://{media_root}/sub/%2E%2E/%2E%2E/secret.wav", settings)


def test_symlink_escape_refused(media_root: pathlib.Path) -> None:
    link = media_root / "sub" / "link.wav"
    os.symlink(media_root.parent / "secret.wav", link)
    settings = _settings(allowed_local_media_path=str(media_root))
    _refused(link.as_uri(), settings)


def test_sibling_with_common_prefix_refused(media_root: pathlib.Path) -> None:
    sibling = media_root.parent / "media-other"
    sibling.mkdir()
    (sibling / "b.wav").write_bytes(WAV)
    settings = _settings(allowed_local_media_path=str(media_root))
    _refused((sibling / "b.wav").as_uri(), settings)


def test_missing_file_and_directory(media_root: pathlib.Path) -> None:
    settings = _settings(allowed_local_media_path=str(media_root))
    _refused((media_root / "nope.wav").as_uri(), settings, "media_fetch_failed")
    _refused((media_root / "sub").as_uri(), settings, "media_fetch_failed")


def test_file_over_byte_cap(media_root: pathlib.Path) -> None:
    settings = _settings(allowed_local_media_path=str(media_root), max_audio_bytes=100)
    with pytest.raises(InvalidAudioError):
        _fetch((media_root / "sub" / "a.wav").as_uri(), settings)


def test_file_with_remote_host_refused(media_root: pathlib.Path) -> None:
    settings = _settings(allowed_local_media_path=str(media_root))
    _refused(f"file://evil.example{media_root}/sub/a.wav", settings)


# --- data: ---------------------------------------------------------------------------


def test_data_uri_ok() -> None:
    encoded = base64.b64encode(WAV).decode()
    for media_type in ("audio/wav", "audio/x-wav", "application/octet-stream", "video/webm"):
        assert _fetch(f"data:{media_type};base64,{encoded}", Settings()) == WAV


def test_data_uri_over_byte_cap() -> None:
    encoded = base64.b64encode(WAV).decode()
    with pytest.raises(InvalidAudioError):
        decode_data_uri(f"data:audio/wav;base64,{encoded}", 100)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:audio/wav;base64", "invalid_data_uri"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_data_uri"),
        ("data:audio/wav;base64,@@@@", "invalid_base64"),
        ("data:audio/wav;base64,", "invalid_base64"),
    ],
)
def test_malformed_data_uri(url: str, code: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        _fetch(url, Settings())
    assert caught.value.code == code


def test_connection_is_pinned_to_the_checked_address() -> None:
    """No second DNS lookup between the check and the connection (DNS rebinding)."""
    import ipaddress

    from oai_audio_server.audio.fetch import _pinned_request

    target, headers, extensions = _pinned_request(
        "https://user@media.example:8443/a.wav?x=1", ipaddress.ip_address("93.184.216.34")
    )
    assert target == "https://93.184.216.34:8443/a.wav?x=1"
    assert headers["Host"] == "media.example:8443"
    assert extensions == {"sni_hostname": "media.example"}
    target, headers, extensions = _pinned_request(
        "http://media.example/a.wav", ipaddress.ip_address("2001:db8::1")
    )
    assert target == "http://[2001:db8::1]/a.wav" and extensions == {}

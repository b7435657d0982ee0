"""Audio carried in the request, decoded in small steps (issue #15): base64 and data: URIs,
from a str or from the bytes of a string cut out of the JSON, give the same bytes as the
standard library, whatever the step boundaries cut through."""

from __future__ import annotations

import base64
import random
from urllib.parse import quote_from_bytes, unquote_to_bytes

import pytest

from oai_audio_server.audio import payload
from oai_audio_server.audio.payload import decode_base64_audio, decode_data_uri
from oai_audio_server.errors import InvalidAudioError, InvalidRequestError


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payload, "STEP_CHARS", 8)


def both_forms(text: str) -> list[str | memoryview]:
    return [text, memoryview(text.encode("ascii"))]


def test_base64_with_whitespace_and_without_padding_in_any_step() -> None:
    rng = random.Random(0)
    for size in [1, 2, 3, 5, 6, 7, 8, 31, 100]:
        raw = rng.randbytes(size)
        encoded = base64.b64encode(raw).decode()
        spaced = "".join(c + (rng.choice(["", "", " ", "\n", "\r\n\t"])) for c in encoded)
        for text in (encoded, encoded.rstrip("="), "  " + spaced + "\n"):
            for form in both_forms(text):
                assert bytes(decode_base64_audio(form, 1000)) == raw, (size, text)


@pytest.mark.parametrize("text", ["QUJD$", "QQ==QUJD", "QUI=QUJDRA==", "   ", "QUJD汉"])
def test_invalid_base64(text: str) -> None:
    forms: list[str | memoryview] = [text]
    if text.isascii():
        forms.append(memoryview(text.encode()))
    for form in forms:
        with pytest.raises(InvalidRequestError) as caught:
            decode_base64_audio(form, 1000)
        assert caught.value.code == "invalid_base64"


def test_base64_over_the_cap() -> None:
    encoded = base64.b64encode(bytes(101)).decode()
    with pytest.raises(InvalidAudioError):
        decode_base64_audio(encoded, 100)
    assert len(decode_base64_audio(encoded, 101)) == 101


def test_percent_encoded_data_uri_in_any_step() -> None:
    rng = random.Random(1)
    for size in [0, 1, 7, 8, 9, 50]:
        raw = rng.randbytes(size)
        for safe in (b"", b"ABCabc%"):  # "%" kept: malformed escapes stay as they are
            encoded = quote_from_bytes(raw, safe=safe.decode())
            for form in both_forms(" data:audio/wav," + encoded + " "):
                assert bytes(decode_data_uri(form, 1000)) == unquote_to_bytes(encoded)
    text = "data:audio/wav,汉%41é" * 3  # raw non-ASCII in a str: its UTF-8 bytes
    assert bytes(decode_data_uri(text, 1000)) == unquote_to_bytes(text.partition(",")[2])


def test_base64_data_uri_from_cut_bytes() -> None:
    raw = random.Random(2).randbytes(40)
    uri = "data:audio/wav;base64," + base64.b64encode(raw).decode()
    for form in both_forms(uri):
        assert bytes(decode_data_uri(form, 1000)) == raw
    with pytest.raises(InvalidRequestError) as caught:
        decode_data_uri(memoryview(b"data:text/plain;base64,QUJD"), 1000)
    assert caught.value.code == "invalid_data_uri"


def test_unicode_whitespace_and_surrogates_in_a_str() -> None:
    raw = b"ABCDEFGH"
    encoded = base64.b64encode(raw).decode()
    assert bytes(decode_base64_audio(encoded[:4] + "\u00a0\u2028" + encoded[4:], 100)) == raw
    with pytest.raises(InvalidRequestError) as caught:
        decode_base64_audio("QUJD\ud800", 100)  # a lone surrogate: invalid, not a crash
    assert caught.value.code == "invalid_base64"


def test_a_view_is_stripped_of_much_whitespace() -> None:
    raw = random.Random(3).randbytes(30)
    uri = b"data:audio/wav;base64," + base64.b64encode(raw)
    padded = b" \n" * 40 + uri + b"\t " * 50
    assert bytes(payload.strip_payload(memoryview(padded))) == uri
    assert bytes(decode_data_uri(memoryview(padded), 1000)) == raw
    assert bytes(payload.strip_payload(memoryview(b" \n\t "))) == b""

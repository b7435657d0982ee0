"""Long audio strings cut out of a JSON body before decoding (issue #15: no request holds
the event loop). The cut body must decode to what the whole body decodes to, with each
placeholder standing for its bytes; a body that is not JSON must stay not JSON. Small
scan steps and a small length threshold put runs across step boundaries."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import msgspec
import pytest

from oai_audio_server.http import long_strings
from oai_audio_server.http.body import least_text_bytes
from oai_audio_server.http.long_strings import LongStrings, cut_long_strings
from oai_audio_server.http.loop_watch import LoopWatch

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
KEYS = ["data", "url", "text", "content", "other", "type", "datas", "xurl"]


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(long_strings, "MIN_LENGTH", 12)
    monkeypatch.setattr(long_strings, "STEP", 7)


def resolved(value: Any, strings: LongStrings) -> Any:
    if isinstance(value, dict):
        return {resolved(k, strings): resolved(v, strings) for k, v in value.items()}
    if isinstance(value, list):
        return [resolved(item, strings) for item in value]
    if isinstance(value, str):
        found = strings.resolve(value)
        return found if isinstance(found, str) else bytes(found).decode("ascii")
    return value


def cut_and_decode(body: bytes) -> tuple[Any, long_strings.CutBody]:
    cut = cut_long_strings(memoryview(body))
    return resolved(msgspec.json.decode(cut.remainder()), cut.strings), cut


def random_string(rng: random.Random) -> str:
    kind = rng.random()
    length = rng.choice([0, 3, 11, 12, 13, 30, 100])
    if kind < 0.6:
        return "".join(rng.choice(ALPHABET) for _ in range(length))
    if kind < 0.75:
        return "data:audio/wav;base64," + "".join(rng.choice(ALPHABET) for _ in range(length))
    if kind < 0.9:  # a long plain stretch with one character that needs escaping or is not ASCII
        plain = "".join(rng.choice(ALPHABET) for _ in range(length))
        at = rng.randint(0, len(plain))
        return plain[:at] + rng.choice('"\\\n\u2028汉é') + plain[at:]
    return "".join(rng.choice(ALPHABET + ' "\\\n汉é:,{}[]') for _ in range(length))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 4 and roll < 0.3:
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 4 and roll < 0.45:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if roll < 0.55:
        return rng.choice([0, -1.5, 10**20, True, None])
    return random_string(rng)


def encodings(value: Any, rng: random.Random) -> list[bytes]:
    compact = msgspec.json.encode(value)
    return [
        compact,
        compact.replace(b"/", b"\\/"),  # a slash only ever stands in a string (PHP)
        compact.replace(b"=", b"\\u003d"),  # so does "=" (Gson)
        compact.replace(b"+", b"\\u002B").replace(b"/", b"\\u002f"),  # .NET, and more
        json.dumps(value, indent=rng.choice([None, 1, "\t"]),
                   separators=rng.choice([(",", ":"), (" , ", " :  ")])).encode(),
    ]


def test_a_cut_body_decodes_to_the_same_value() -> None:
    rng = random.Random(0)
    cuts = 0
    for _ in range(400):
        value = random_value(rng)
        for body in encodings(value, rng):
            decoded, cut = cut_and_decode(body)
            assert decoded == msgspec.json.decode(body), body
            cuts += len(cut.cuts)
    assert cuts > 100  # the generator does reach the cutting path


def test_only_whole_audio_values_are_cut() -> None:
    long = "QUJD" * 10
    body = msgspec.json.encode({
        "data": long, "url": "data:audio/wav;base64," + long, "text": long, "other": long,
        "list": [long], "nested": {"data": long},
    })
    decoded, cut = cut_and_decode(body)
    assert len(cut.cuts) == 3
    assert cut.long_text_bytes == len(long)
    assert decoded == msgspec.json.decode(body)
    for trap in [
        b'{"x": "a\\"data\\": \\"' + long.encode() + b'\\""}',  # a key inside a string
        b'{"a\\"data": "' + long.encode() + b'"}',  # a key that ends in "data
        b'{"data": "' + long.encode() + b'\\n"}',  # an escape other than \\/ at the end
        b'{"data": "\\\\/' + long.encode() + b'"}',  # an escaped backslash, then a slash
        b'{"data": "\\u0022' + long.encode() + b'"}',  # an escaped quote is not plain
        b'{"data": "\\\\u0041' + long.encode() + b'"}',  # an escaped backslash, then u0041
    ]:
        decoded, cut = cut_and_decode(trap)
        assert cut.cuts == [], trap
        assert decoded == msgspec.json.decode(trap)


def test_a_key_at_the_edge_of_the_key_window_is_judged_whole() -> None:
    """The key pattern looks back a fixed number of bytes; an escaped quote before the
    key must be seen wherever the key falls in that window."""
    value = b'"' + b"QUJD" * 10 + b'"'
    for pad in range(40, 80):
        for key in (b'"\\"data"', b'"\\"text"'):
            body = b"{" + key + b" " * pad + b":" + value + b"}"
            decoded, cut = cut_and_decode(body)
            assert cut.cuts == [] and cut.long_text_bytes == 0, (pad, key)
            assert decoded == msgspec.json.decode(body)
        body = b'{"data"' + b" " * pad + b":" + value + b"}"
        fits = len(b'"data"') + pad + len(b":") <= long_strings._KEY_WINDOW
        assert len(cut_and_decode(body)[1].cuts) == (1 if fits else 0), pad


def test_a_body_that_is_not_json_stays_invalid() -> None:
    rng = random.Random(1)
    checked = 0
    for _ in range(3000):
        body = bytearray(rng.choice(encodings(random_value(rng), rng)))
        for _ in range(rng.randint(1, 3)):  # break it: a quote, backslash or colon moves
            at = rng.randrange(len(body) + 1)
            if rng.random() < 0.5 and at < len(body):
                del body[at]
            else:
                body[at:at] = rng.choice([b'"', b"\\", b":", b'"data":"', b"}", b"\\u00"])
        try:
            expected = msgspec.json.decode(bytes(body))
        except msgspec.DecodeError:
            with pytest.raises(msgspec.DecodeError):
                cut_and_decode(bytes(body))
            checked += 1
            continue
        assert cut_and_decode(bytes(body))[0] == expected
    assert checked > 1000


def test_escaped_slashes_are_not_counted_as_text() -> None:
    audio = msgspec.json.encode({"data": "ab/cd+/" * 1000}).replace(b"/", b"\\/")
    assert least_text_bytes(audio) == 0
    assert least_text_bytes(b'{"t": "\\\\/\\\\/"}') <= 2  # two escaped backslashes: 2 bytes
    assert least_text_bytes(b'{"t": "\\n\\n\\n\\n"}') == 2


def test_the_loop_watch_sees_a_callback_that_holds_the_loop() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    watch = LoopWatch(registry, "t")

    async def main() -> None:
        watch.start()
        await asyncio.sleep(0.05)
        time.sleep(0.12)  # holds the loop, as a decode holding the GIL would
        await asyncio.sleep(0.05)
        await watch.stop()

    asyncio.run(main())
    assert watch.worst_seconds >= 0.1
    exposed = generate_latest(registry).decode()
    assert 't_event_loop_lag_seconds_bucket{le="0.1"}' in exposed
    assert "t_event_loop_lag_max_seconds " in exposed

"""Streamed deltas always add up to the whole answer, as the official chat decodes it."""

from __future__ import annotations

import random

import pytest

from oai_audio_server.engine.detokenizer import IncrementalText

TOKENS = [bytes([i]) for i in range(256)] + [b"<|0.50|>"]


def stream(
    data: list[int], stop: tuple[str, ...] = (), strip: bool = True
) -> tuple[list[str], str]:
    text = IncrementalText(TOKENS, stop=stop, strip=strip)
    deltas = []
    for token in data:
        deltas.append(text.push(token))
        if text.stopped:
            break
    deltas.append(text.finish())
    return [d for d in deltas if d], text.text


def official(data: list[int], stop: tuple[str, ...] = ()) -> str:
    full = b"".join(TOKENS[t] for t in data).decode("utf-8", errors="replace")
    cuts = [i for s in stop if (i := full.find(s)) >= 0]
    return (full[: min(cuts)] if cuts else full).strip()


def test_never_splits_a_character() -> None:
    deltas, _ = stream(list("héllo 你好".encode()))
    assert "".join(deltas) == "héllo 你好"
    assert all("\ufffd" not in d for d in deltas)


def test_strips_like_the_official_chat() -> None:
    deltas, _ = stream(list(b"\n  answer  \n"))
    assert "".join(deltas) == "answer"


def test_stop_string_never_leaks() -> None:
    deltas, _ = stream(list(b"one two STOP three"), stop=("STOP",))
    assert "".join(deltas) == "one two"
    assert not any("S" in d for d in deltas)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_match_the_whole_decode(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = list(b"ab \n") + [0xE4, 0xBD, 0xA0, 0xFF, 0xC3, 0xA9, 256]
    for _ in range(400):
        data = [rng.choice(alphabet) for _ in range(rng.randint(0, 14))]
        stop = rng.choice([(), ("a",), ("b ",), ("ab", "<|0"), ("\ufffd",)])
        deltas, _ = stream(data, stop)
        assert "".join(deltas) == official(data, stop), (data, stop)

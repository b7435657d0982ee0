"""The special-token cleaner and timestamp parser (pure functions, no server)."""

from __future__ import annotations

import random

import pytest

from oai_audio_server.transcription.timestamps import (
    Marker,
    TextCleaner,
    TimedSpan,
    clean_text,
    split_pieces,
    timed_spans,
)


def stream_clean(raw: str, cuts: list[int]) -> str:
    cleaner = TextCleaner()
    out, start = [], 0
    for cut in [*cuts, len(raw)]:
        out.append(cleaner.push(raw[start:cut]))
        start = cut
    out.append(cleaner.finish())
    return "".join(out)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("hello world", "hello world"),
        ("<|0.00|> Hello there.<|1.20|>", "Hello there."),
        ("<|startoftranscript|><|en|><|transcribe|> hi<|endoftext|>", "hi"),
        ("a <|1.00|> b", "a b"),
        ("a\n\n<|1.00|>\nb", "a\nb"),
        ("  padded  ", "padded"),
        ("x < y and a|b", "x < y and a|b"),
        ("<|not a token|>", "<not a token|>"),
        ("<|a<|b|>|>", "<a|>"),
        ("<<|b|>|c|>", "<c|>"),
        ("<|" + "x" * 40 + "|>", "<" + "x" * 40 + "|>"),
        ("<|", "<"),
        ("<|0.5|", "<0.5|"),
        ("<audio>a</audio>", "<audio>a</audio>"),
        ("", ""),
        ("<|1.00|>", ""),
    ],
)
def test_clean_text(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


def test_cleaned_text_never_contains_a_token_opening() -> None:
    rng = random.Random(7)
    alphabet = ["<", "|", ">", "a", " ", "1", ".", "<|", "|>", "<|0.5|>", "\n"]
    for _ in range(3000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert "<|" not in clean_text(raw), raw


def test_streaming_equals_whole_text_for_any_chunking() -> None:
    rng = random.Random(11)
    alphabet = ["<", "|", ">", "ab", " ", "  ", "1.5", "<|0.5|>", "<|en|>", "\n", "é"]
    for _ in range(2000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        cuts = sorted(rng.sample(range(len(raw) + 1), k=min(len(raw) + 1, rng.randint(0, 6))))
        assert stream_clean(raw, cuts) == clean_text(raw), (raw, cuts)


def test_split_pieces_reports_markers() -> None:
    pieces = split_pieces("<|0.00|> hi<|en|>there<|2.5|>")
    assert pieces == [Marker("0.00"), " hi", Marker("en"), "there", Marker("2.5")]
    assert [p.seconds for p in pieces if isinstance(p, Marker)] == [0.0, None, 2.5]


def test_no_timestamps_is_one_span_over_the_segment() -> None:
    assert timed_spans("just words", 12.5) == [TimedSpan(0.0, 12.5, "just words")]
    assert timed_spans("<|en|>  ", 12.5) == []


def test_whisper_style_pairs() -> None:
    raw = "<|0.00|> Hello there.<|1.20|><|1.40|> General Kenobi.<|3.00|>"
    assert timed_spans(raw, 30.0) == [
        TimedSpan(0.0, 1.2, "Hello there."),
        TimedSpan(1.4, 3.0, "General Kenobi."),
    ]


def test_single_timestamps_between_texts() -> None:
    raw = "<|0.00|> one<|1.50|> two<|2.50|>"
    assert timed_spans(raw, 10.0) == [TimedSpan(0.0, 1.5, "one"), TimedSpan(1.5, 2.5, "two")]


def test_untimed_text_borrows_neighbouring_times() -> None:
    assert timed_spans("lead in <|2.00|> tail", 10.0) == [
        TimedSpan(0.0, 2.0, "lead in"),
        TimedSpan(2.0, 10.0, "tail"),
    ]


def test_times_are_clamped_and_monotonic() -> None:
    raw = "<|5.00|> a<|99.00|><|3.00|> b<|4.00|>"
    spans = timed_spans(raw, 30.0)
    assert [s.text for s in spans] == ["a", "b"]
    assert spans[0] == TimedSpan(5.0, 30.0, "a")
    assert spans[1].start >= spans[0].end and spans[1].end >= spans[1].start
    for span in spans:
        assert 0.0 <= span.start <= span.end <= 30.0


def test_non_time_tokens_inside_a_span_are_removed() -> None:
    raw = "<|0.00|><|en|> bonjour<|de|>tout<|1.00|>"
    assert timed_spans(raw, 5.0) == [TimedSpan(0.0, 1.0, "bonjour tout")]

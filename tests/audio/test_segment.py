from __future__ import annotations

import numpy as np
import pytest

from oai_audio_server.audio import MAX_SEGMENT_SAMPLES, SAMPLE_RATE, split_audio


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def test_short_audio_is_one_segment() -> None:
    samples = _noise(12.5)
    segments = split_audio(samples)
    assert len(segments) == 1
    assert segments[0].start_sample == 0
    assert segments[0].end_sample == samples.shape[0]
    assert segments[0].end_seconds == 12.5


def test_exactly_30_seconds_is_one_segment() -> None:
    assert len(split_audio(_noise(30.0))) == 1


def test_95_seconds_gives_4_segments_covering_every_sample_in_order() -> None:
    samples = _noise(95.0)
    segments = split_audio(samples)
    assert len(segments) == 4
    assert segments[0].start_sample == 0
    assert segments[-1].end_sample == samples.shape[0]
    for before, after in zip(segments, segments[1:], strict=False):
        assert before.end_sample == after.start_sample
    for segment in segments:
        assert 0 < segment.samples.shape[0] <= MAX_SEGMENT_SAMPLES
        assert segment.end_sample - segment.start_sample == segment.samples.shape[0]
    np.testing.assert_array_equal(np.concatenate([s.samples for s in segments]), samples)
    assert segments[1].start_seconds == segments[1].start_sample / SAMPLE_RATE


@pytest.mark.parametrize("gap_start_seconds", [29.05, 29.5, 29.85])
def test_cut_lands_in_a_quiet_gap_in_the_last_second(gap_start_seconds: float) -> None:
    samples = _noise(70.0)
    gap_start = int(gap_start_seconds * SAMPLE_RATE)
    gap_end = gap_start + SAMPLE_RATE // 8  # 125 ms of silence
    samples[gap_start:gap_end] = 0.0
    first_cut = split_audio(samples)[0].end_sample
    assert gap_start <= first_cut <= gap_end


def test_cut_in_second_segment_is_relative_to_its_start() -> None:
    samples = _noise(70.0)
    first_cut = split_audio(samples)[0].end_sample
    gap_start = first_cut + int(29.4 * SAMPLE_RATE)
    samples[gap_start : gap_start + 2400] = 0.0
    segments = split_audio(samples)
    assert gap_start <= segments[1].end_sample <= gap_start + 2400


def test_cut_without_quiet_gap_stays_within_the_last_second() -> None:
    samples = _noise(61.0)
    for segment in split_audio(samples)[:-1]:
        length = segment.samples.shape[0]
        assert MAX_SEGMENT_SAMPLES - SAMPLE_RATE < length <= MAX_SEGMENT_SAMPLES


def test_silence_cuts_as_late_as_possible() -> None:
    segments = split_audio(np.zeros(40 * SAMPLE_RATE, np.float32))
    assert segments[0].end_sample == MAX_SEGMENT_SAMPLES - SAMPLE_RATE // 20

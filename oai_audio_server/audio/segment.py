"""Split long audio into segments of at most 30 s, cutting in the quietest spot.

A hard cut every 30 s splits words in half. Like vLLM, each cut is placed at the
centre of the quietest 100 ms window (lowest RMS) within the last second before the
30 s limit. Segments are consecutive and together cover every sample, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oai_audio_server.audio.decode import SAMPLE_RATE

MAX_SEGMENT_SAMPLES = 30 * SAMPLE_RATE  # 480000: the encoder's fixed 30 s window
SEARCH_SAMPLES = SAMPLE_RATE  # look for a cut in the last second before the limit
WINDOW_SAMPLES = SAMPLE_RATE // 10  # 100 ms RMS windows
HOP_SAMPLES = SAMPLE_RATE // 100  # try a window every 10 ms


@dataclass(frozen=True)
class AudioSegment:
    samples: np.ndarray  # a view into the source samples
    start_sample: int
    end_sample: int  # exclusive

    @property
    def start_seconds(self) -> float:
        return self.start_sample / SAMPLE_RATE

    @property
    def end_seconds(self) -> float:
        return self.end_sample / SAMPLE_RATE


def split_audio(
    samples: np.ndarray, *, max_samples: int = MAX_SEGMENT_SAMPLES
) -> list[AudioSegment]:
    """Split 16 kHz mono ``samples`` into consecutive segments of at most ``max_samples``."""
    if max_samples < 2 * WINDOW_SAMPLES:
        raise ValueError(f"max_samples must be at least {2 * WINDOW_SAMPLES}")
    total = int(samples.shape[0])
    segments: list[AudioSegment] = []
    start = 0
    while total - start > max_samples:
        cut = find_quiet_cut(samples, start + max_samples, max_samples)
        segments.append(AudioSegment(samples[start:cut], start, cut))
        start = cut
    segments.append(AudioSegment(samples[start:total], start, total))
    return segments


def find_quiet_cut(samples: np.ndarray, limit: int, max_samples: int) -> int:
    """The centre of the quietest 100 ms window that ends at or before ``limit``.

    Windows start within the last second (or the last third of a shorter
    ``max_samples``) before ``limit``; on ties the latest window wins, which keeps
    segments as long as possible.
    """
    search = min(SEARCH_SAMPLES, max_samples // 3)
    region_start = limit - search
    region = samples[region_start:limit].astype(np.float64)
    squares = np.concatenate(([0.0], np.cumsum(region * region)))
    window_starts = np.arange(0, search - WINDOW_SAMPLES + 1, HOP_SAMPLES)
    energies = squares[window_starts + WINDOW_SAMPLES] - squares[window_starts]
    # Rounding in the running sum can make equal windows differ by a few ulps.
    quietest = energies.min()
    tolerance = 1e-9 * max(float(squares[-1]), 1e-30)
    best = int(np.flatnonzero(energies <= quietest + tolerance)[-1])
    return region_start + int(window_starts[best]) + WINDOW_SAMPLES // 2

"""Server VAD: an energy detector over 10 ms frames of the session's input.

Why energy and not silero-vad: silero's package runs its network through onnxruntime
or fetches it with torch.hub, which means another heavy dependency or a download at
run time, and this server must start offline. A frame is speech when its RMS level is
above a threshold; OpenAI's ``threshold`` (0..1, default 0.5) maps onto -60..-10 dBFS
(0.5 -> -35 dBFS). Speech starts after ``MIN_SPEECH_MS`` of loud frames (a click does not
start a turn) and stops after ``silence_duration_ms`` of quiet ones. Reported times are
milliseconds of audio since the session began, on 10 ms frame boundaries; the start
includes ``prefix_padding_ms`` (as OpenAI's ``audio_start_ms`` does) and the stop includes
the silence, so a turn's audio is exactly ``[audio_start_ms, audio_end_ms)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_MS = 10
MIN_SPEECH_MS = 60
QUIET_DBFS = -60.0
LOUD_DBFS = -10.0


def threshold_level(threshold: float) -> float:
    """OpenAI's 0..1 threshold as an RMS level of full scale (1.0)."""
    clamped = min(max(threshold, 0.0), 1.0)
    return float(10 ** ((QUIET_DBFS + (LOUD_DBFS - QUIET_DBFS) * clamped) / 20))


@dataclass(frozen=True)
class SpeechStart:
    start_ms: int  # prefix padding included


@dataclass(frozen=True)
class SpeechStop:
    end_ms: int


VadEvent = SpeechStart | SpeechStop


class EnergyVad:
    def __init__(
        self, rate: int, threshold: float, prefix_padding_ms: int, silence_duration_ms: int
    ) -> None:
        self._frame = rate * FRAME_MS // 1000
        self._level = threshold_level(threshold)
        self._prefix_ms = max(0, prefix_padding_ms)
        self._silence_frames = max(1, silence_duration_ms // FRAME_MS)
        self._speech_frames_needed = MIN_SPEECH_MS // FRAME_MS
        self._pending = np.zeros(0, dtype=np.int16)
        self._frames_seen = 0  # frames since the session began
        self._loud_run = 0
        self._quiet_run = 0
        self.in_speech = False
        self.floor_ms = 0  # a start is never placed before this (the last turn's end)

    def reset(self, now_ms: int) -> None:
        """Forget the current speech (the buffer was cleared or committed by hand)."""
        self.in_speech = False
        self._loud_run = self._quiet_run = 0
        self.floor_ms = now_ms

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        data = np.concatenate([self._pending, samples]) if self._pending.size else samples
        whole = data.shape[0] - data.shape[0] % self._frame
        self._pending = data[whole:].copy()
        if not whole:
            return []
        frames = data[:whole].astype(np.float32).reshape(-1, self._frame) / 32768.0
        levels = np.sqrt(np.mean(frames * frames, axis=1))
        events: list[VadEvent] = []
        for level in levels:
            self._frames_seen += 1
            loud = bool(level >= self._level)
            if not self.in_speech:
                self._loud_run = self._loud_run + 1 if loud else 0
                if self._loud_run >= self._speech_frames_needed:
                    self.in_speech = True
                    self._quiet_run = 0
                    first = (self._frames_seen - self._loud_run) * FRAME_MS
                    events.append(SpeechStart(max(self.floor_ms, first - self._prefix_ms)))
            else:
                self._quiet_run = 0 if loud else self._quiet_run + 1
                if self._quiet_run >= self._silence_frames:
                    self.in_speech = False
                    self._loud_run = 0
                    end = self._frames_seen * FRAME_MS
                    self.floor_ms = end
                    events.append(SpeechStop(end))
        return events

"""The confidence fields of a transcript: ``avg_logprob`` and ``no_speech_prob`` of each
``verbose_json`` segment, and the per-token log probabilities of ``include[]=logprobs``.

* ``avg_logprob``: the mean log probability of the tokens the model wrote for the audio
  window (up to 30 s) the segment comes from, in the distribution named in
  engine/sampling.py; the stop token is not counted. A window with no tokens at all
  reports 0.0 (nothing was written, so nothing was uncertain).
* ``no_speech_prob``: Qwen-Audio has no "no speech" token to read a probability from
  (Whisper reads its ``<|nospeech|>``), so it is estimated from the signal: the share of
  the segment's 10 ms frames whose loudest mel band stays below ``SILENT_LEVEL`` in
  Whisper's normalised log-mel scale, about -50 dBFS for white noise. A silent segment
  reports 1.0 and a segment that is sound throughout 0.0, so the usual filter
  (``no_speech_prob > 0.6`` and ``avg_logprob < -1``) drops segments written over
  silence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oai_audio_server.engine.types import TokenLogprob
from oai_audio_server.transcription.protocol import TranscriptLogprob

FRAMES_PER_SECOND = 100
# (log10(power) + 4) / 4 in Whisper's features: 0.0 is a power of 1e-4; white noise at
# -60 dBFS measures about -0.2 and at -45 dBFS about +0.15.
SILENT_LEVEL = 0.0


def mean_logprob(logprobs: Sequence[TokenLogprob]) -> float:
    if not logprobs:
        return 0.0
    return round(sum(item.logprob for item in logprobs) / len(logprobs), 6)


def silent_share(mel: torch.Tensor, start: float, end: float) -> float:
    """``mel`` [n_mels, frames] of one audio window; ``start``/``end`` in seconds from
    the window's start."""
    first = max(0, int(start * FRAMES_PER_SECOND))
    last = min(mel.shape[-1], max(first + 1, int(round(end * FRAMES_PER_SECOND))))
    if last <= first:
        return 1.0
    loudest = mel[:, first:last].max(dim=0).values
    return round(float((loudest < SILENT_LEVEL).float().mean()), 4)


def token_logprobs(
    logprobs: Sequence[TokenLogprob], token_bytes: Sequence[bytes]
) -> list[TranscriptLogprob]:
    out = []
    for item in logprobs:
        raw = token_bytes[item.token_id] if 0 <= item.token_id < len(token_bytes) else b""
        out.append(TranscriptLogprob(token=raw.decode("utf-8", "replace"),
                                     logprob=item.logprob, bytes=list(raw)))
    return out

"""Value types the audio intake hands to the rest of the server."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AudioSegmentFeatures:
    """One segment of at most 30 s, ready for the audio encoder."""

    mel: torch.Tensor  # [n_mels, 3000] float32, CPU
    length_after_cnn: int
    token_count: int  # audio tokens; the prompt span is token_count + 2 (start/end tags)
    start_seconds: float
    end_seconds: float

    @property
    def nbytes(self) -> int:
        return int(self.mel.element_size() * self.mel.nelement())


@dataclass(frozen=True)
class PreparedAudio:
    """A whole source audio: its digest, its duration and its segments in order."""

    digest: str  # sha256 hex of the source bytes
    duration_seconds: float
    segments: tuple[AudioSegmentFeatures, ...]

    @property
    def nbytes(self) -> int:
        return sum(segment.nbytes for segment in self.segments)

    @property
    def token_count(self) -> int:
        """Audio tokens over all segments, not counting the <audio>/</audio> tags."""
        return sum(segment.token_count for segment in self.segments)

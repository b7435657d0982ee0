"""Whisper-style log-mel features exactly as the official Qwen-Audio code computes them.

Each segment (at most 30 s at 16 kHz) is zero-padded to 480000 samples and turned into
an [80, 3000] log-mel with the checkpoint's ``mel_filters.npz``. The lengths follow
the official ``process_audio``: mel frames = samples // 160, then the two encoder
convolutions (kernel 3, padding 1, strides 1 and 2), then the 2x pooling that gives
the number of audio tokens.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from oai_audio_server.audio.decode import SAMPLE_RATE
from oai_audio_server.audio.segment import MAX_SEGMENT_SAMPLES
from oai_audio_server.audio.types import AudioSegmentFeatures

N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
N_FRAMES = MAX_SEGMENT_SAMPLES // HOP_LENGTH  # 3000
MEL_FILTERS_FILE = "mel_filters.npz"
MEL_FILTERS_KEY = "mel_80"
# (padding, kernel, stride) of the audio encoder's two convolutions.
_CONV_LAYERS: tuple[tuple[int, int, int], ...] = ((1, 3, 1), (1, 3, 2))


def length_after_cnn(mel_frames: int) -> int:
    length = mel_frames
    for padding, kernel, stride in _CONV_LAYERS:
        length = 1 + (length + 2 * padding - kernel) // stride
    return length


def audio_token_count(after_cnn: int) -> int:
    return (after_cnn - 2) // 2 + 1


def min_samples_for_one_token() -> int:
    """Fewest samples that give at least one audio token (480, i.e. 30 ms)."""
    frames = 1
    while audio_token_count(length_after_cnn(frames)) < 1:
        frames += 1
    return frames * HOP_LENGTH


class MelFeatureExtractor:
    """Turns segments of 16 kHz mono samples into the encoder's log-mel input.

    Stateless after construction, so one instance may serve many threads.
    """

    def __init__(
        self, mel_filters: np.ndarray | torch.Tensor, *, round_up_frames: bool = False
    ) -> None:
        """``mel_filters`` [n_mels, 201]: 80 for Qwen-Audio, 128 for Qwen2-Audio.
        ``round_up_frames``: an audio of n samples counts ceil(n / 160) mel frames (the
        attention mask of transformers' WhisperFeatureExtractor) instead of n // 160 (the
        official Qwen-Audio code)."""
        filters = torch.as_tensor(np.asarray(mel_filters), dtype=torch.float32)
        if filters.ndim != 2 or filters.shape[1] != N_FFT // 2 + 1:
            raise ValueError(
                f"mel filters must have shape (n_mels, {N_FFT // 2 + 1}), "
                f"got {tuple(filters.shape)}"
            )
        self._filters = filters.contiguous()
        self._window = torch.hann_window(N_FFT)
        self._round_up_frames = round_up_frames

    @property
    def n_mels(self) -> int:
        return int(self._filters.shape[0])

    def mel_frames(self, samples: int) -> int:
        """Mel frames of real audio (not padding) in ``samples`` samples."""
        if self._round_up_frames:
            return -(-samples // HOP_LENGTH)
        return samples // HOP_LENGTH

    @classmethod
    def from_checkpoint(cls, model_dir: pathlib.Path) -> MelFeatureExtractor:
        path = pathlib.Path(model_dir) / MEL_FILTERS_FILE
        with np.load(path, allow_pickle=False) as archive:
            return cls(archive[MEL_FILTERS_KEY])

    def log_mel(self, samples_16k: np.ndarray) -> torch.Tensor:
        """The [n_mels, 3000] float32 log-mel of ``samples_16k`` padded with zeros to 30 s."""
        count = int(samples_16k.shape[0])
        if count > MAX_SEGMENT_SAMPLES:
            raise ValueError(f"a segment holds at most {MAX_SEGMENT_SAMPLES} samples, got {count}")
        # Frames whose window lies wholly in the zero padding have zero power, so only
        # the frames that touch real samples are transformed (plus enough zeros that the
        # STFT's reflect padding at the end mirrors zeros, as it does on the full 30 s);
        # the rest of the 3000 frames are filled with zero power. Same result, a fraction
        # of the work for short audio.
        computed = min(MAX_SEGMENT_SAMPLES, -(-(count + 2 * N_FFT) // HOP_LENGTH) * HOP_LENGTH)
        padded = torch.zeros(computed, dtype=torch.float32)
        padded[:count] = torch.from_numpy(np.ascontiguousarray(samples_16k, dtype=np.float32))
        spectrum = torch.stft(padded, N_FFT, HOP_LENGTH, window=self._window, return_complex=True)
        frames = computed // HOP_LENGTH
        power = torch.zeros(N_FFT // 2 + 1, N_FRAMES, dtype=torch.float32)
        power[:, :frames] = spectrum[..., :frames].abs() ** 2
        mel = self._filters @ power
        log_mel = torch.clamp(mel, min=1e-10).log10()
        log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
        return ((log_mel + 4.0) / 4.0).contiguous()

    def extract(
        self, samples_16k: np.ndarray, *, start_seconds: float = 0.0
    ) -> AudioSegmentFeatures:
        count = int(samples_16k.shape[0])
        mel = self.log_mel(samples_16k)
        after_cnn = length_after_cnn(self.mel_frames(count))
        return AudioSegmentFeatures(
            mel=mel,
            length_after_cnn=after_cnn,
            token_count=audio_token_count(after_cnn),
            start_seconds=start_seconds,
            end_seconds=start_seconds + count / SAMPLE_RATE,
        )

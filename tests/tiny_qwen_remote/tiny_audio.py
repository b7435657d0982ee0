"""Audio front end of the tiny Qwen-Audio test checkpoint.

Produces the same tensors the published model's tokenizer hands to its model: a
Whisper-style 80 x 3000 log-mel per audio plus the frame/token counts that decide
how many placeholder tokens an audio occupies in the prompt. Only local files are
supported: tests must never touch the network.
"""

import os
from typing import Optional

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
MAX_SAMPLES = 30 * SAMPLE_RATE  # the model sees at most 30 s; longer input is cut
N_FRAMES = MAX_SAMPLES // HOP_LENGTH  # 3000

MEL_FILTERS_FILE = "mel_filters.npz"


def load_audio_file(path: str) -> np.ndarray:
    """Decode a local file to 16 kHz mono float32 in [-1, 1).

    The published loader pipes the file through the ffmpeg CLI as s16le and divides
    by 32768; going through s16 here too keeps the quantisation identical.
    """
    import av  # imported lazily so the tokenizer loads even where PyAV is absent

    chunks = []
    with av.open(path) as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise RuntimeError(f"Failed to load audio: no audio stream in {path!r}")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        # Flushing returns the samples the resampler still buffers.
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    pcm = np.concatenate(chunks).astype(np.int16)
    return pcm.astype(np.float32) / 32768.0


def pad_or_trim(audio: np.ndarray, length: int = MAX_SAMPLES) -> np.ndarray:
    if audio.shape[0] >= length:
        return audio[:length]
    return np.pad(audio, (0, length - audio.shape[0]))


def find_mel_filters(*candidate_dirs: Optional[str]) -> str:
    """First existing mel_filters.npz among the given directories."""
    for d in candidate_dirs:
        if d and os.path.isfile(os.path.join(d, MEL_FILTERS_FILE)):
            return os.path.join(d, MEL_FILTERS_FILE)
    raise FileNotFoundError(f"{MEL_FILTERS_FILE} not found in any of {candidate_dirs}")


_FILTER_CACHE = {}


def load_mel_filters(path: str) -> torch.Tensor:
    if path not in _FILTER_CACHE:
        with np.load(path) as f:
            _FILTER_CACHE[path] = torch.from_numpy(np.asarray(f[f"mel_{N_MELS}"], dtype=np.float32))
    return _FILTER_CACHE[path]


def log_mel(audio: np.ndarray, filters: torch.Tensor) -> torch.Tensor:
    """Whisper-style log-mel of a 30 s (padded) waveform: [80, 3000]."""
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    spec = torch.stft(wave, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    # torch.stft with center=True yields one frame too many for 3000 hops.
    power = spec[..., :-1].abs() ** 2
    mel = filters @ power
    logs = torch.clamp(mel, min=1e-10).log10()
    # Compress the dynamic range to 8 decades below the loudest bin, then rescale.
    logs = torch.maximum(logs, logs.max() - 8.0)
    return (logs + 4.0) / 4.0


def frames_after_cnn(mel_len: int) -> int:
    """Length after the encoder's two convolutions (k3 p1 s1, then k3 p1 s2)."""
    length = mel_len
    for kernel, pad, stride in ((3, 1, 1), (3, 1, 2)):
        length = (length + 2 * pad - (kernel - 1) - 1) // stride + 1
    return length


def audio_token_count(after_cnn: int) -> int:
    """Tokens left after the encoder's stride-2 average pooling."""
    return (after_cnn - 2) // 2 + 1

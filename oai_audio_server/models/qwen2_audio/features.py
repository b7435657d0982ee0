"""Qwen2-Audio's log-mel front end, as its ``preprocessor_config.json`` describes it
(transformers' WhisperFeatureExtractor: 16 kHz, n_fft 400, hop 160, 30 s windows, here
128 mel bins).

The STFT, log and clamping are the shared :class:`MelFeatureExtractor`; what differs
from Qwen-Audio is the filter bank (computed here, not read from a file: Slaney-style
mel scale with Slaney area normalisation, 0-8000 Hz) and the frame count of an audio of
n samples, ceil(n / 160), which is what the extractor's attention mask sums to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from oai_audio_server.audio.decode import SAMPLE_RATE
from oai_audio_server.audio.features import HOP_LENGTH, N_FFT, MelFeatureExtractor
from oai_audio_server.models.checkpoint import UnsupportedCheckpointError

PREPROCESSOR_FILE = "preprocessor_config.json"

_LINEAR_TOP_HZ = 1000.0  # below this the Slaney mel scale is linear
_LINEAR_STEP_HZ = 200.0 / 3.0
_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    linear = hz / _LINEAR_STEP_HZ
    top = _LINEAR_TOP_HZ / _LINEAR_STEP_HZ
    log_part = top + np.log(np.maximum(hz, 1e-10) / _LINEAR_TOP_HZ) / _LOG_STEP
    return np.where(hz >= _LINEAR_TOP_HZ, log_part, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    top = _LINEAR_TOP_HZ / _LINEAR_STEP_HZ
    return np.where(
        mel >= top, _LINEAR_TOP_HZ * np.exp(_LOG_STEP * (mel - top)), mel * _LINEAR_STEP_HZ
    )


def slaney_mel_filters(
    n_mels: int, *, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
    fmin: float = 0.0, fmax: float | None = None,
) -> np.ndarray:
    """Triangular filters [n_mels, n_fft // 2 + 1], each scaled to unit area (2 / width)."""
    top = sample_rate / 2 if fmax is None else fmax
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(fmin)), hz_to_mel(np.array(top)), n_mels + 2))
    filters = np.zeros((n_mels, bins.shape[0]), dtype=np.float64)
    for m in range(n_mels):
        low, centre, high = edges[m], edges[m + 1], edges[m + 2]
        rising = (bins - low) / (centre - low)
        falling = (high - bins) / (high - centre)
        filters[m] = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (high - low))
    return filters.astype(np.float32)


def read_preprocessor(model_dir: Path) -> dict[str, object]:
    path = Path(model_dir) / PREPROCESSOR_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def qwen2_mel_extractor(model_dir: Path, n_mels_default: int = 128) -> MelFeatureExtractor:
    """The extractor for the checkpoint; a preprocessor config this code does not
    reproduce (another rate, hop, FFT size or window length) is an error."""
    config = read_preprocessor(model_dir)
    expected = {"sampling_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_fft": N_FFT,
                "chunk_length": 30}
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise UnsupportedCheckpointError(
                f"{PREPROCESSOR_FILE} sets {key}={config[key]!r}; this server computes "
                f"features with {key}={value}"
            )
    n_mels = int(str(config.get("feature_size", n_mels_default)))
    return MelFeatureExtractor(slaney_mel_filters(n_mels), round_up_frames=True)

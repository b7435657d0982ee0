from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from audio_factory import chirp, encode, reference_log_mel, slaney_mel_filters

from oai_audio_server.audio import (
    SAMPLE_RATE,
    MelFeatureExtractor,
    audio_token_count,
    decode_audio,
    length_after_cnn,
)


def _official_lengths(n_samples: int) -> tuple[int, int]:
    """The official process_audio arithmetic, spelled out by hand."""
    mel_len = n_samples // 160
    conv1 = 1 + (mel_len + 2 - 3) // 1
    conv2 = 1 + (conv1 + 2 - 3) // 2
    return conv2, (conv2 - 2) // 2 + 1


@pytest.mark.parametrize(
    ("seconds", "after_cnn", "tokens"), [(1.0, 50, 25), (5.9, 295, 147), (30.0, 1500, 750)]
)
def test_shapes_and_lengths(
    extractor: MelFeatureExtractor, seconds: float, after_cnn: int, tokens: int
) -> None:
    samples = chirp(seconds, SAMPLE_RATE)
    features = extractor.extract(samples, start_seconds=30.0)
    assert features.mel.shape == (80, 3000)
    assert features.mel.dtype == torch.float32
    assert features.mel.device.type == "cpu"
    assert features.length_after_cnn == after_cnn
    assert features.token_count == tokens
    assert (features.length_after_cnn, features.token_count) == _official_lengths(samples.shape[0])
    assert features.start_seconds == 30.0
    assert features.end_seconds == pytest.approx(30.0 + seconds)


@pytest.mark.parametrize("n_samples", [0, 159, 160, 479, 480, 481, 16001, 94400, 479999, 480000])
def test_length_formula_matches_official(n_samples: int) -> None:
    after = length_after_cnn(n_samples // 160)
    assert (after, audio_token_count(after)) == _official_lengths(n_samples)


@pytest.mark.parametrize("seconds", [1.0, 17.3, 30.0])
def test_log_mel_matches_an_independent_float64_implementation(
    extractor: MelFeatureExtractor, mel_filters: np.ndarray, seconds: float
) -> None:
    samples = chirp(seconds, SAMPLE_RATE)
    ours = extractor.log_mel(samples).numpy()
    reference = reference_log_mel(samples, mel_filters)
    # float32 torch.stft against float64 numpy: log10 differences stay tiny.
    assert np.max(np.abs(ours - reference)) < 2e-4


def test_rejects_more_than_30_seconds(extractor: MelFeatureExtractor) -> None:
    with pytest.raises(ValueError):
        extractor.extract(np.zeros(480001, np.float32))


def test_rejects_filters_of_the_wrong_shape() -> None:
    # Any mel count (80 for Qwen-Audio, 128 for Qwen2-Audio) over the 201 STFT bins.
    assert MelFeatureExtractor(np.zeros((128, 201), np.float32)).n_mels == 128
    for shape in ((80, 200), (80, 201, 1), (201,)):
        with pytest.raises(ValueError):
            MelFeatureExtractor(np.zeros(shape, np.float32))


def test_from_checkpoint_reads_mel_80(checkpoint_dir: pathlib.Path) -> None:
    extractor = MelFeatureExtractor.from_checkpoint(checkpoint_dir)
    samples = chirp(2.0, SAMPLE_RATE)
    expected = MelFeatureExtractor(slaney_mel_filters()).log_mel(samples)
    torch.testing.assert_close(extractor.log_mel(samples), expected)


def test_features_of_48k_stereo_and_16k_mono_sources_agree(
    extractor: MelFeatureExtractor,
) -> None:
    """Same signal, two sources: 48 kHz stereo (resampled and downmixed) vs 16 kHz mono.

    Tolerance on the (x + 4) / 4 log-mel scale, whose values span 2 (8 decades / 4):
    mean absolute difference < 0.002, 99th percentile < 0.01, maximum < 0.05
    (measured: about 0.0002, 0.003 and 0.01).
    """
    seconds = 4.0

    def signal(rate: int) -> np.ndarray:
        t = np.arange(int(seconds * rate)) / rate
        return (
            0.2 * np.sin(2 * np.pi * 300 * t)
            + 0.1 * np.sin(2 * np.pi * (500 * t + 400 * t * t))
            + 0.05 * np.sin(2 * np.pi * 2500 * t)
        ).astype(np.float32)

    stereo_48k = encode(signal(48000), 48000, container="wav", codec="pcm_s16le", channels=2)
    mono_16k = encode(signal(16000), 16000, container="wav", codec="pcm_s16le", channels=1)
    a = decode_audio(stereo_48k, format_hint=None, max_seconds=10)
    b = decode_audio(mono_16k, format_hint=None, max_seconds=10)
    assert a.shape == b.shape
    mel_a = extractor.extract(a).mel.numpy()
    mel_b = extractor.extract(b).mel.numpy()
    frames = int(seconds * 100)
    difference = np.abs(mel_a[:, 5 : frames - 5] - mel_b[:, 5 : frames - 5])
    assert float(difference.mean()) < 0.002
    assert float(np.percentile(difference, 99)) < 0.01
    assert float(difference.max()) < 0.05

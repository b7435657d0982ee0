from __future__ import annotations

import pathlib

import numpy as np
import pytest
from audio_factory import slaney_mel_filters

from oai_audio_server.audio import MelFeatureExtractor


@pytest.fixture(scope="session")
def mel_filters() -> np.ndarray:
    return slaney_mel_filters()


@pytest.fixture(scope="session")
def checkpoint_dir(
    tmp_path_factory: pytest.TempPathFactory, mel_filters: np.ndarray
) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("checkpoint")
    np.savez(directory / "mel_filters.npz", mel_80=mel_filters)
    return directory


@pytest.fixture(scope="session")
def extractor(checkpoint_dir: pathlib.Path) -> MelFeatureExtractor:
    return MelFeatureExtractor.from_checkpoint(checkpoint_dir)

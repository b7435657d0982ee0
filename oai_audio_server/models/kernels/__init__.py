"""Triton kernels for the CUDA decode path. Imported only where they run: the CPU path
and the tests' references are plain PyTorch (models/attention.py, models/layers.py)."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None

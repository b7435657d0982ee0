"""The CUDA path's Triton kernels equal the PyTorch reference paths, run by Triton's
interpreter on the CPU (paged decode attention for multi-head and grouped-query layouts
and block sizes; the fused residual add + RMSNorm)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is in the test extra; install '.[test]'")

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_equal_the_reference_paths() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "tests" / "triton_interpreted.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kernels ok" in out.stdout

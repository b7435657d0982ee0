"""Runs the Triton kernels in Triton's interpreter (on the CPU) against the PyTorch
reference paths; started by test_triton_kernels.py in a process of its own, because
TRITON_INTERPRET must be set before Triton is imported."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from oai_audio_server.models.attention import DecodeMeta, decode_attention  # noqa: E402
from oai_audio_server.models.kernels.fused import add_rmsnorm  # noqa: E402
from oai_audio_server.models.kernels.paged_attention import paged_decode_attention  # noqa: E402
from oai_audio_server.models.layers import RMSNorm  # noqa: E402


def check_paged_attention(heads: int, kv_heads: int, block_size: int) -> None:
    torch.manual_seed(heads * 100 + kv_heads + block_size)
    head_dim, rows, blocks = 16, 3, 24
    cache = torch.randn(blocks * block_size, 2, kv_heads, head_dim)
    lengths = [1, block_size * 3 + 5, block_size * 7]  # one row of a single position
    order = torch.randperm(blocks - 1) + 1  # scattered blocks, block 0 unused
    tables = torch.zeros(rows, 8, dtype=torch.long)
    used = 0
    for row, length in enumerate(lengths):
        count = -(-length // block_size)
        tables[row, :count] = order[used : used + count]
        used += count
    q = torch.randn(rows, heads, head_dim)
    positions = torch.tensor(lengths) - 1
    kv_len = 8 * block_size
    meta = DecodeMeta(tables, positions, block_size, kv_len, "sdpa").prepared(torch.float32)
    expected = decode_attention(q, cache, meta, None)
    got = paged_decode_attention(q, cache, tables, positions + 1, block_size, head_dim**-0.5,
                                 tile=2 * block_size)
    error = (got - expected).abs().max().item()
    assert error < 1e-5, (heads, kv_heads, block_size, error)
    # Not vacuous: a row's output depends on its own last positions.
    shorter = paged_decode_attention(q, cache, tables, positions, block_size, head_dim**-0.5)
    assert (shorter[1:] - got[1:]).abs().max().item() > 1e-3


def check_add_rmsnorm() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x, residual = torch.randn(5, 48), torch.randn(5, 48)
    for res in (residual, None):
        expected = norm.add_forward(x, res)
        got = add_rmsnorm(x, res, norm.weight.detach(), norm.eps)
        for a, b in zip(got, expected, strict=True):
            assert (a - b).abs().max().item() < 1e-5


if __name__ == "__main__":
    with torch.inference_mode():
        for heads, kv_heads, block_size in ((4, 4, 16), (8, 2, 16), (4, 1, 8)):
            check_paged_attention(heads, kv_heads, block_size)
        check_add_rmsnorm()
    print("kernels ok")
    sys.exit(0)

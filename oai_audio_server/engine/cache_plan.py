"""How big the paged KV cache is, and how many sequences run at once.

Memory is counted in blocks of ``--kv-block-size`` positions. On a GPU the budget is what
``--gpu-memory-fraction`` of the device leaves after the weights and a reserve for
activations and graphs; on a CPU it is room for ``--max-batch-size`` full-length
sequences (8 by default). ``--kv-cache-memory-mb`` sets it outright. Sequences hold blocks
only for the tokens they have, so the batch is limited by rows (the largest CUDA graph) and
the engine admits by free blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from oai_audio_server.models.attention import AttentionBackend
from oai_audio_server.models.kv_cache import KVLayout, blocks_for_budget, blocks_needed
from oai_audio_server.settings import Settings

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
CPU_DEFAULT_BATCH = 8
# Activations of a prefill chunk, logits of captured graphs, the audio encoder's batch.
GPU_RESERVE_BYTES = 4 * 1024 * MIB
LARGEST_GRAPH_BATCH = 128


@dataclass(frozen=True)
class CacheOptions:
    kv_cache_memory_mb: int = 0
    gpu_memory_fraction: float = 0.9
    cuda_graphs: bool = True
    max_prefill_tokens: int = 2048
    block_size: int = 16
    attention_backend: str = "auto"
    num_blocks: int = 0  # 0 = from the memory budget (tests set a small cache outright)
    prefix_caching: bool = True  # engine/prefix.py

    @classmethod
    def from_settings(cls, settings: Settings) -> CacheOptions:
        return cls(
            kv_cache_memory_mb=settings.kv_cache_memory_mb,
            gpu_memory_fraction=settings.gpu_memory_fraction,
            cuda_graphs=settings.cuda_graphs,
            max_prefill_tokens=settings.max_prefill_tokens,
            block_size=settings.kv_block_size,
            attention_backend=settings.attention_backend,
            prefix_caching=settings.prefix_caching,
        )


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int  # blocks the engine hands out (block 0, for padding rows, comes extra)
    block_size: int
    max_len: int  # the longest sequence: --max-model-len, or less if the cache is smaller
    max_batch_size: int
    budget_bytes: int


def plan_cache(
    layout: KVLayout, max_len: int, device: torch.device, options: CacheOptions,
    max_batch_size: int,
) -> CachePlan:
    block_size = options.block_size
    if block_size < 1:
        raise ValueError("--kv-block-size must be at least 1")
    sequence_bytes = layout.bytes_per_position * max_len
    if options.kv_cache_memory_mb > 0:
        budget = options.kv_cache_memory_mb * MIB
    elif device.type == "cuda":
        torch.cuda.empty_cache()  # memory freed while loading is not in use
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * options.gpu_memory_fraction) - used - GPU_RESERVE_BYTES
    else:
        budget = sequence_bytes * (max_batch_size or CPU_DEFAULT_BATCH)
    one_sequence = blocks_needed(max_len, block_size)
    if options.num_blocks > 0:
        blocks = options.num_blocks
    elif options.kv_cache_memory_mb <= 0 and device.type != "cuda":
        blocks = one_sequence * (max_batch_size or CPU_DEFAULT_BATCH)
    else:
        blocks = blocks_for_budget(layout, block_size, max(budget, 0)) - 1  # less padding
    if blocks < 1:
        raise RuntimeError(
            f"the KV cache budget ({max(budget, 0) // MIB} MiB) holds no block of "
            f"{block_size} positions; raise --kv-cache-memory-mb / --gpu-memory-fraction"
        )
    if blocks < one_sequence:
        logger.warning(
            "the KV cache holds %d positions, fewer than --max-model-len %d: sequences are "
            "limited to %d tokens (raise --kv-cache-memory-mb / --gpu-memory-fraction, or "
            "lower --max-model-len)", blocks * block_size, max_len, blocks * block_size,
        )
        max_len = blocks * block_size
    if max_batch_size > 0:
        batch = max_batch_size
    elif device.type == "cuda":
        batch = LARGEST_GRAPH_BATCH
    else:
        batch = CPU_DEFAULT_BATCH
    return CachePlan(
        num_blocks=blocks, block_size=block_size, max_len=max_len, max_batch_size=batch,
        budget_bytes=budget,
    )


def pick_attention_backend(setting: str, device: torch.device) -> AttentionBackend:
    """``auto``: the Triton kernel on CUDA when Triton imports, else PyTorch's SDPA. A
    backend asked for by name that cannot run is an error, never a silent fallback."""
    from oai_audio_server.models.kernels import triton_available

    if setting == "sdpa":
        return "sdpa"
    usable = device.type == "cuda" and triton_available()
    if setting == "triton":
        if not usable:
            raise RuntimeError(
                "--attention-backend triton needs a CUDA device and the triton package; "
                "use --attention-backend sdpa or auto"
            )
        return "triton"
    return "triton" if usable else "sdpa"

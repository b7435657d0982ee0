"""How big the KV cache is, and so how many sequences run at once.

One slot holds a whole sequence of ``max_model_len`` positions. On a GPU the budget is
what ``--gpu-memory-fraction`` of the device leaves after the weights and a reserve for
activations and graphs; on a CPU it is room for ``--max-batch-size`` sequences (8 by
default). ``--kv-cache-memory-mb`` sets it outright.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oai_audio_server.engine.kv_cache import KVLayout, slots_for_budget
from oai_audio_server.settings import Settings

MIB = 1024 * 1024
CPU_DEFAULT_BATCH = 8
# Activations of a prefill, logits of captured graphs, the audio encoder's batch.
GPU_RESERVE_BYTES = 4 * 1024 * MIB
LARGEST_GRAPH_BATCH = 128


@dataclass(frozen=True)
class CacheOptions:
    kv_cache_memory_mb: int = 0
    gpu_memory_fraction: float = 0.9
    cuda_graphs: bool = True
    max_prefill_tokens: int = 8192

    @classmethod
    def from_settings(cls, settings: Settings) -> CacheOptions:
        return cls(
            kv_cache_memory_mb=settings.kv_cache_memory_mb,
            gpu_memory_fraction=settings.gpu_memory_fraction,
            cuda_graphs=settings.cuda_graphs,
            max_prefill_tokens=settings.max_prefill_tokens,
        )


@dataclass(frozen=True)
class CachePlan:
    slots: int
    max_batch_size: int
    budget_bytes: int


def plan_cache(
    layout: KVLayout, slot_len: int, device: torch.device, options: CacheOptions,
    max_batch_size: int,
) -> CachePlan:
    slot_bytes = layout.bytes_per_position * slot_len
    if options.kv_cache_memory_mb > 0:
        budget = options.kv_cache_memory_mb * MIB
    elif device.type == "cuda":
        torch.cuda.empty_cache()  # memory freed while loading is not in use
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * options.gpu_memory_fraction) - used - GPU_RESERVE_BYTES
    else:
        budget = slot_bytes * (max_batch_size or CPU_DEFAULT_BATCH)
    slots = slots_for_budget(layout, slot_len, max(budget, 0))
    if slots < 1:
        raise RuntimeError(
            f"the KV cache budget ({max(budget, 0) // MIB} MiB) holds no sequence of "
            f"{slot_len} tokens ({slot_bytes // MIB} MiB each); lower --max-model-len or "
            "raise --kv-cache-memory-mb / --gpu-memory-fraction"
        )
    if max_batch_size > 0:
        batch = min(max_batch_size, slots)
    elif device.type == "cuda":
        batch = min(slots, LARGEST_GRAPH_BATCH)
    else:
        batch = min(slots, CPU_DEFAULT_BATCH)
    return CachePlan(slots=min(slots, batch), max_batch_size=batch, budget_bytes=budget)

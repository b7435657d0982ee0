"""Which waiting requests start at the next step boundary: decided on lengths alone.

With a slot KV cache any request can join a running batch at any step, at its own
length, so the only limits are free slots and how long one prefill may pause the rows
already decoding. The queue is first-in first-out: a request never passes an earlier
one, so nothing starves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    prompt_len: int
    waited_steps: int = 0  # decode steps since it was queued


def plan_admission(
    waiting: Sequence[Waiting],
    *,
    running: int,
    capacity: int,
    max_prefill_tokens: int,
    join_wait_steps: int = 0,
) -> list[int]:
    """Indices (into ``waiting``) of the requests to prefill now, in queue order.

    - at most the free slots (``capacity - running``);
    - at most ``max_prefill_tokens`` padded prompt tokens in one prefill (the prompts are
      right-padded to the longest, so rows x longest counts), but always the first waiting
      request when a slot is free (a long prompt is never stuck);
    - while a batch runs and the queue holds fewer requests than free slots, requests
      wait up to ``join_wait_steps`` decode steps for company, so that requests arriving
      close together share one prefill (each prefill pauses every running row once).
    """
    free = capacity - running
    if free <= 0 or not waiting:
        return []
    gathering = running > 0 and len(waiting) < free
    if gathering and all(w.waited_steps < join_wait_steps for w in waiting):
        return []
    chosen: list[int] = []
    longest = 0
    for index, request in enumerate(waiting):
        if len(chosen) == free:
            break
        padded = (len(chosen) + 1) * max(longest, request.prompt_len)
        if chosen and padded > max_prefill_tokens:
            break
        chosen.append(index)
        longest = max(longest, request.prompt_len)
    return chosen

"""Which waiting requests start at the next step boundary: decided on sizes alone.

On a paged KV cache a request can join the running batch at any step; what limits it is a
free row (the batch's size) and free blocks for its whole prompt (its answer's blocks are
taken one at a time as it decodes; when they run out the engine preempts, see core.py).
The queue is first-in first-out: a request never passes an earlier one, so nothing starves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    blocks: int  # KV-cache blocks its prompt needs
    waited_steps: int = 0  # decode steps since it was queued
    rows: int = 1  # a request with several choices of one prompt starts them together


def plan_admission(
    waiting: Sequence[Waiting],
    *,
    running: int,
    capacity: int,
    free_blocks: int,
    join_wait_steps: int = 0,
) -> list[int]:
    """Indices (into ``waiting``) of the requests to start now, in queue order.

    - at most the free rows (``capacity - running``);
    - only while the free blocks hold each one's prompt, in queue order (the first that
      does not fit stops the rest: it is next once blocks free up);
    - while a batch runs and the queue holds fewer requests than free rows, requests wait
      up to ``join_wait_steps`` decode steps for company, so that requests arriving close
      together share one prefill pass.
    """
    free_rows = capacity - running
    if free_rows <= 0 or not waiting:
        return []
    gathering = running > 0 and sum(w.rows for w in waiting) < free_rows
    if gathering and all(w.waited_steps < join_wait_steps for w in waiting):
        return []
    chosen: list[int] = []
    for index, request in enumerate(waiting):
        if request.rows > free_rows or request.blocks > free_blocks:
            break
        chosen.append(index)
        free_rows -= request.rows
        free_blocks -= request.blocks
    return chosen

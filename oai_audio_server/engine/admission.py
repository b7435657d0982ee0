"""Which waiting requests start now, and how: the engine's admission policy.

Pure decisions over lengths, so every rule is testable without a model. The cache of
a batch has one length shared by all rows (the Qwen remote code takes rotary positions
from it), so a joining row is left-padded to that length, and the length only grows
while the batch runs. Three ways to start a waiting request:

- join: prefill it alone, padded to the batch's length, between two decode steps;
- rebuild: when joining would leave most of the cache as padding, re-prefill the
  running rows (prompt and answer so far) together with the newcomers, each padded only
  to the longest of them: the batch restarts compact and no one waits for it to drain;
- wait: for the batch to drain (a request that can never fit this batch), or for a
  few steps while a running batch has room, so that requests arriving close together
  join in one prefill: every join holds all running rows for one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# A plan keeps at least this share of the batch's cache (rows x shared length) holding
# real tokens rather than left padding, which every decode step pays for.
MIN_CACHE_FILL = 0.5


@dataclass(frozen=True)
class Waiting:
    prompt_len: int
    max_tokens: int
    waited_steps: int = 0  # decode steps run since it was queued


@dataclass(frozen=True)
class Running:
    prompt_len: int
    max_tokens: int
    generated: int
    # False when its answer holds tokens that a prompt-style forward would read as
    # markup (an audio span marker): such a row cannot be re-prefilled.
    recomputable: bool = True

    @property
    def real_len(self) -> int:
        return self.prompt_len + self.generated

    @property
    def final_len(self) -> int:
        return self.prompt_len + self.max_tokens


@dataclass(frozen=True)
class Plan:
    how: Literal["start", "join", "rebuild", "wait"]
    admit: tuple[int, ...] = ()  # indices into the waiting queue, oldest first


WAIT = Plan("wait")


def plan_fresh(waiting: Sequence[Waiting], max_batch: int, limit: int | None) -> Plan:
    """No batch running: the oldest requests start together, as long as every row stays
    within ``limit`` (the length up to which batched answers equal solo ones) although
    it is padded to the longest prompt. A request past the limit on its own runs alone."""
    admit: list[int] = []
    for index, request in enumerate(waiting[:max_batch]):
        group = [*(waiting[i] for i in admit), request]
        if admit and limit is not None and _padded_final_len(group) > limit:
            break
        admit.append(index)
    return Plan("start", tuple(admit)) if admit else WAIT


def plan_running(
    rows: Sequence[Running],
    length: int,
    waiting: Sequence[Waiting],
    max_batch: int,
    limit: int | None,
    join_wait_steps: int = 0,
) -> Plan:
    """A batch is running with cache ``length``.

    Joining: the queue is scanned oldest first. A prompt longer than the cache is passed
    over (the cache grows a token a step, so it joins soon, ahead of younger requests); a
    request that could never fit this batch under ``limit`` stops the scan, so the batch
    drains and it starts the next one. If nothing can join only because the cache would
    be mostly padding, the batch is rebuilt compact when that is enough to keep it full.
    Joiners that would leave the batch short of full wait until the oldest of them has
    waited ``join_wait_steps`` decode steps, gathering later arrivals into the same join.
    """
    if limit is not None and any(r.final_len > limit for r in rows):
        return WAIT  # a long row runs alone
    room = max_batch - len(rows)
    if room <= 0 or not waiting:
        return WAIT
    joined: list[int] = []
    used = sum(r.real_len for r in rows)
    for index, request in enumerate(waiting):
        if len(joined) >= room:
            break
        if limit is not None and max(request.prompt_len, length) + request.max_tokens > limit:
            break
        if request.prompt_len > length:
            continue
        if not _full_enough(used + request.prompt_len, len(rows) + len(joined) + 1, length):
            if not joined:
                return _plan_rebuild(rows, length, waiting, room, limit, join_wait_steps)
            break
        joined.append(index)
        used += request.prompt_len
    return _after_gathering(Plan("join", tuple(joined)), waiting, room, join_wait_steps)


def _plan_rebuild(
    rows: Sequence[Running],
    length: int,
    waiting: Sequence[Waiting],
    room: int,
    limit: int | None,
    join_wait_steps: int,
) -> Plan:
    """Running rows and the oldest waiting requests re-prefilled at the longest of their
    real lengths, if that batch is full enough and shorter than the current one (after
    the same gathering wait as a join: a rebuild also holds every running row)."""
    if not all(r.recomputable for r in rows):
        return WAIT
    lengths = [r.real_len for r in rows]
    most_tokens = 0  # the newcomers' largest max_tokens: each grows from the compact length
    admit: list[int] = []
    for index, request in enumerate(waiting[:room]):
        new_lengths = [*lengths, request.prompt_len]
        compact = max(new_lengths)
        new_most = max(most_tokens, request.max_tokens)
        if limit is not None and compact + new_most > limit:
            break
        if not _full_enough(sum(new_lengths), len(new_lengths), compact):
            break
        admit.append(index)
        lengths, most_tokens = new_lengths, new_most
    if max(lengths) >= length:
        return WAIT
    return _after_gathering(Plan("rebuild", tuple(admit)), waiting, room, join_wait_steps)


def _after_gathering(
    plan: Plan, waiting: Sequence[Waiting], room: int, join_wait_steps: int
) -> Plan:
    """The plan, unless it leaves the batch short of full and its oldest request has
    waited fewer than ``join_wait_steps`` steps: more may arrive to share the prefill."""
    if not plan.admit:
        return WAIT
    oldest = max(waiting[i].waited_steps for i in plan.admit)
    if len(plan.admit) < room and oldest < join_wait_steps:
        return WAIT
    return plan


def _full_enough(real_tokens: int, rows: int, length: int) -> bool:
    return real_tokens >= MIN_CACHE_FILL * rows * length


def _padded_final_len(group: Sequence[Waiting]) -> int:
    """The longest a row of this group can grow, every prompt padded to the longest."""
    return max(r.prompt_len for r in group) + max(r.max_tokens for r in group)

"""The admission policy on lengths alone: free slots, the prefill budget, gathering."""

from __future__ import annotations

from oai_audio_server.engine.admission import Waiting, plan_admission


def plan(waiting: list[Waiting], **kw: int) -> list[int]:
    options = {"running": 0, "capacity": 8, "max_prefill_tokens": 1000, "join_wait_steps": 0}
    options.update(kw)
    return plan_admission(waiting, **options)


def test_nothing_waiting_or_no_free_slot_admits_nothing() -> None:
    assert plan([]) == []
    assert plan([Waiting(10)], running=8) == []


def test_oldest_first_up_to_the_free_slots() -> None:
    waiting = [Waiting(10) for _ in range(6)]
    assert plan(waiting, running=5) == [0, 1, 2]
    assert plan(waiting, running=0, capacity=4) == [0, 1, 2, 3]


def test_any_length_joins_a_running_batch() -> None:
    # No shared cache length: a 3000-token prompt joins short rows mid-way.
    assert plan([Waiting(3000)], running=3, max_prefill_tokens=8192) == [0]


def test_prefill_budget_bounds_one_pass_but_never_blocks_the_first() -> None:
    waiting = [Waiting(600), Waiting(600), Waiting(10)]
    assert plan(waiting) == [0]  # in queue order: the 10-token one does not pass
    assert plan([Waiting(5000), Waiting(10)]) == [0]


def test_the_budget_counts_padding_to_the_longest_prompt() -> None:
    # One pass pads every prompt to the longest: 1 x 600 + 127 x 16 tokens would be a
    # 128 x 600 pass. The budget of 1000 holds one row of 600, or 62 rows of 16.
    assert plan([Waiting(600)] + [Waiting(16)] * 127, capacity=128) == [0]
    assert plan([Waiting(16)] * 100, capacity=128) == list(range(62))
    assert plan([Waiting(16)] * 3 + [Waiting(400)], capacity=128) == [0, 1, 2]
    assert plan([Waiting(16)] * 2 + [Waiting(400)], capacity=128, max_prefill_tokens=1200) == [
        0, 1, 2
    ]


def test_gathering_waits_a_few_steps_while_a_batch_runs() -> None:
    young = [Waiting(10, waited_steps=1)]
    assert plan(young, running=2, join_wait_steps=2) == []
    assert plan([Waiting(10, waited_steps=2)], running=2, join_wait_steps=2) == [0]
    # Nothing running: no reason to wait. Enough waiting to fill the batch: go.
    assert plan(young, running=0, join_wait_steps=2) == [0]
    full = [Waiting(10, waited_steps=0) for _ in range(6)]
    assert plan(full, running=2, join_wait_steps=2) == [0, 1, 2, 3, 4, 5]

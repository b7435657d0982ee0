"""The admission policy on sizes alone: free rows, free blocks, gathering."""

from __future__ import annotations

from oai_audio_server.engine.admission import Waiting, plan_admission


def plan(waiting: list[Waiting], **kw: int) -> list[int]:
    options = {"running": 0, "capacity": 8, "free_blocks": 1000, "join_wait_steps": 0}
    options.update(kw)
    return plan_admission(waiting, **options)


def test_nothing_waiting_or_no_free_row_admits_nothing() -> None:
    assert plan([]) == []
    assert plan([Waiting(10)], running=8) == []


def test_oldest_first_up_to_the_free_rows() -> None:
    waiting = [Waiting(10) for _ in range(6)]
    assert plan(waiting, running=5) == [0, 1, 2]
    assert plan(waiting, running=0, capacity=4) == [0, 1, 2, 3]


def test_any_length_joins_a_running_batch() -> None:
    # No shared cache length: a long prompt joins short rows mid-way (it is prefilled in
    # chunks, so no prefill budget applies to admission).
    assert plan([Waiting(300)], running=3) == [0]


def test_admission_stops_at_the_first_prompt_the_free_blocks_cannot_hold() -> None:
    waiting = [Waiting(40), Waiting(70), Waiting(1)]
    assert plan(waiting, free_blocks=100) == [0]  # the 1-block one does not pass
    assert plan(waiting, free_blocks=110) == [0, 1]
    assert plan(waiting, free_blocks=111) == [0, 1, 2]
    assert plan([Waiting(5)], free_blocks=4) == []


def test_gathering_waits_a_few_steps_while_a_batch_runs() -> None:
    young = [Waiting(10, waited_steps=1)]
    assert plan(young, running=2, join_wait_steps=2) == []
    assert plan([Waiting(10, waited_steps=2)], running=2, join_wait_steps=2) == [0]
    # with nothing running there is nobody to wait for
    assert plan(young, running=0, join_wait_steps=2) == [0]
    # a queue that fills the free rows needs no company
    assert plan([Waiting(10, waited_steps=0)] * 6, running=2, join_wait_steps=2) == list(
        range(6)
    )

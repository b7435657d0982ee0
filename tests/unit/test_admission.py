"""The admission policy on lengths alone: start, join, rebuild or wait."""

from __future__ import annotations

from oai_audio_server.engine.admission import (
    WAIT,
    Plan,
    Running,
    Waiting,
    plan_fresh,
    plan_running,
)


def test_fresh_batch_takes_the_oldest_up_to_the_batch_size() -> None:
    waiting = [Waiting(10, 20) for _ in range(5)]
    assert plan_fresh(waiting, max_batch=3, limit=2048) == Plan("start", (0, 1, 2))


def test_fresh_long_request_runs_alone() -> None:
    waiting = [Waiting(10, 20), Waiting(2000, 100), Waiting(10, 20)]
    assert plan_fresh(waiting, max_batch=8, limit=2048) == Plan("start", (0,))
    assert plan_fresh(waiting[1:], max_batch=8, limit=2048) == Plan("start", (0,))


def test_nothing_waiting_waits() -> None:
    assert plan_fresh([], max_batch=8, limit=None) == WAIT
    assert plan_running([Running(10, 50, 5)], 15, [], max_batch=8, limit=None) == WAIT


def test_short_prompts_join_a_young_batch() -> None:
    rows = [Running(20, 64, 4)]
    waiting = [Waiting(18, 64), Waiting(24, 64), Waiting(12, 64)]
    # 24 > the cache length (24 would fit; 25 would not): the 24 joins, all three do.
    assert plan_running(rows, 24, waiting, max_batch=8, limit=2048) == Plan("join", (0, 1, 2))


def test_a_prompt_longer_than_the_cache_is_passed_over() -> None:
    rows = [Running(20, 64, 2)]
    waiting = [Waiting(40, 64), Waiting(15, 64)]
    assert plan_running(rows, 22, waiting, max_batch=8, limit=2048) == Plan("join", (1,))


def test_room_in_the_batch_bounds_the_joins() -> None:
    rows = [Running(20, 64, 2)] * 3
    waiting = [Waiting(20, 64)] * 3
    assert plan_running(rows, 22, waiting, max_batch=4, limit=2048) == Plan("join", (0,))
    assert plan_running(rows * 2, 22, waiting, max_batch=4, limit=2048) == WAIT


def test_a_request_that_would_pass_the_limit_makes_the_batch_drain() -> None:
    rows = [Running(20, 64, 30)]
    waiting = [Waiting(20, 2000), Waiting(10, 10)]
    assert plan_running(rows, 50, waiting, max_batch=8, limit=2048) == WAIT


def test_a_long_running_row_runs_alone() -> None:
    rows = [Running(1000, 1500, 10)]
    assert plan_running(rows, 1010, [Waiting(5, 5)], max_batch=8, limit=2048) == WAIT


def test_mostly_padding_rebuilds_when_compaction_fills_the_cache() -> None:
    # One young row (20 prompt + 5 answer) in a cache grown to 120 by rows now gone:
    # joining a 20-token prompt would leave (25 + 20) / (2 * 120) real. Rebuilt at the
    # longest real length (25), it is (25 + 20) / (2 * 25) real.
    rows = [Running(20, 64, 5)]
    waiting = [Waiting(20, 64), Waiting(22, 64)]
    assert plan_running(rows, 120, waiting, max_batch=8, limit=2048) == Plan("rebuild", (0, 1))


def test_rebuild_takes_newcomers_only_while_the_compact_cache_stays_full() -> None:
    rows = [Running(20, 64, 5)]
    waiting = [Waiting(20, 64), Waiting(200, 64), Waiting(20, 64)]
    # The 200-token prompt would make the compact cache mostly padding: the rebuild takes
    # the oldest request only, and the queue keeps its order.
    assert plan_running(rows, 300, waiting, max_batch=8, limit=2048) == Plan("rebuild", (0,))


def test_rebuild_that_would_not_shorten_the_cache_waits() -> None:
    # An old row with no padding fills the cache; a young one joined late is mostly
    # padding. Compacting cannot shorten the cache below the old row's length.
    rows = [Running(20, 200, 180), Running(10, 200, 5)]
    assert plan_running(rows, 200, [Waiting(10, 64)], max_batch=8, limit=2048) == WAIT


def test_rebuild_respects_the_limit() -> None:
    rows = [Running(20, 64, 5)]
    waiting = [Waiting(20, 64), Waiting(20, 2026), Waiting(20, 64)]
    # The second would end past the limit even in the compact cache: it and everything
    # younger stay queued.
    assert plan_running(rows, 120, waiting, max_batch=8, limit=2048) == Plan("rebuild", (0,))


def test_joiners_that_leave_room_wait_a_few_steps_for_company() -> None:
    rows = [Running(20, 64, 10)] * 5
    one = [Waiting(20, 64, waited_steps=1)]
    assert plan_running(rows, 30, one, max_batch=8, limit=2048, join_wait_steps=4) == WAIT
    later = [Waiting(20, 64, waited_steps=4), Waiting(20, 64, waited_steps=0)]
    assert plan_running(rows, 30, later, max_batch=8, limit=2048, join_wait_steps=4) == Plan(
        "join", (0, 1)
    )


def test_joiners_that_fill_the_batch_do_not_wait() -> None:
    rows = [Running(20, 64, 10)] * 6
    waiting = [Waiting(20, 64), Waiting(20, 64)]
    assert plan_running(rows, 30, waiting, max_batch=8, limit=2048, join_wait_steps=4) == Plan(
        "join", (0, 1)
    )


def test_a_rebuild_gathers_like_a_join() -> None:
    rows = [Running(20, 64, 5)]
    fresh = [Waiting(20, 64, waited_steps=0)]
    assert plan_running(rows, 120, fresh, max_batch=8, limit=2048, join_wait_steps=4) == WAIT
    aged = [Waiting(20, 64, waited_steps=4)]
    assert plan_running(rows, 120, aged, max_batch=8, limit=2048, join_wait_steps=4) == Plan(
        "rebuild", (0,)
    )


def test_a_fresh_batch_counts_the_padding_against_the_limit() -> None:
    # Alone each is within 2048; together the second is padded to 1500 and would grow
    # to 1500 + 1900.
    waiting = [Waiting(1500, 500), Waiting(100, 1900), Waiting(100, 100)]
    assert plan_fresh(waiting, max_batch=8, limit=2048) == Plan("start", (0,))
    assert plan_fresh(waiting[1:], max_batch=8, limit=2048) == Plan("start", (0, 1))


def test_a_rebuild_checks_every_newcomer_against_the_final_compact_length() -> None:
    # A later, longer prompt raises the compact length: the earlier newcomer with a large
    # max_tokens would then end past the limit, so the scan stops before the longer one.
    rows = [Running(250, 1000, 50)]
    waiting = [Waiting(200, 10), Waiting(100, 1700), Waiting(600, 10)]
    plan = plan_running(rows, 1000, waiting, max_batch=8, limit=2048)
    assert plan == Plan("rebuild", (0, 1))
    admitted = [waiting[i] for i in plan.admit]
    compact = max([300] + [w.prompt_len for w in admitted])
    assert all(compact + w.max_tokens <= 2048 for w in admitted)


def test_rows_that_cannot_be_recomputed_are_never_rebuilt() -> None:
    rows = [Running(20, 64, 5, recomputable=False)]
    assert plan_running(rows, 120, [Waiting(20, 64)], max_batch=8, limit=2048) == WAIT

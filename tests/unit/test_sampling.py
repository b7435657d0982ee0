from __future__ import annotations

import torch

from oai_audio_server.engine.sampling import (
    RowSampling,
    SamplingPlan,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    make_generator,
    sample,
)
from oai_audio_server.engine.types import SamplingParams

CPU = torch.device("cpu")


def rows_of(*params: SamplingParams, seen: list[list[int]] | None = None) -> list[RowSampling]:
    return [
        RowSampling(p, make_generator(p, CPU), torch.tensor(seen[i]) if seen else None)
        for i, p in enumerate(params)
    ]


def run(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    return sample(logits, rows, SamplingPlan(rows, CPU)).tolist()


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    assert run(logits, rows_of(greedy, greedy)) == [1, 0]


def test_repetition_penalty_matches_transformers_rule() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    # In a batch: only the penalised row changes its choice.
    batch = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    penalised = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=2.0)
    plain = SamplingParams(max_tokens=1, temperature=0.0)
    assert run(batch, rows_of(penalised, plain, seen=[[0], [0]])) == [1, 0]


def test_top_k_and_top_p_per_row() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    kept = torch.isfinite(filter_top_k(logits, torch.tensor([2, 0, 1])))
    assert kept.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    kept = torch.isfinite(filter_top_p(logits, torch.tensor([0.5, 0.79, 1.0])))
    assert kept.tolist() == [
        [True, False, False, False], [True, True, False, False], [True] * 4
    ]


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=0)
    rows = rows_of(params)
    counts = [0, 0, 0, 0]
    for _ in range(2000):
        counts[run(torch.log(probs)[None, :], rows)[0]] += 1
    assert counts[3] == 0
    assert 1250 < counts[0] < 1550 and 280 < counts[1] < 520 and 120 < counts[2] < 280


def test_seeded_rows_repeat_whatever_else_is_in_the_batch() -> None:
    logits = torch.zeros(3, 1000)

    def draw(seed: int, neighbours: int) -> list[int]:
        seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=seed)
        others = [SamplingParams(max_tokens=1, temperature=0.7, seed=99)] * neighbours
        rows = rows_of(*others, seeded)
        return [run(logits[: neighbours + 1], rows)[-1] for _ in range(8)]

    assert draw(1, 0) == draw(1, 2)
    assert draw(1, 0) != draw(2, 0)


def test_coalesce_joins_adjacent_text_only() -> None:
    from oai_audio_server.engine.types import Finished, TextDelta, coalesce

    end = Finished("stop", 1, 2)
    assert coalesce([TextDelta("a"), TextDelta("b"), end, TextDelta("c")]) == [
        TextDelta("ab"), end, TextDelta("c")
    ]
    assert coalesce([]) == []


def test_a_top_k_beyond_any_tensor_keeps_every_token_and_fails_nobody() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 2))
    huge = SamplingParams(max_tokens=1, temperature=1.0, top_k=2**64, seed=1)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    rows = rows_of(huge, greedy)
    plan = SamplingPlan(rows, CPU)  # building the batch's tensors does not overflow
    assert plan.top_k.tolist() == [2**31 - 1]
    assert run(logits, rows)[1] == 0

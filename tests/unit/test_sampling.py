from __future__ import annotations

import torch

from oai_audio_server.engine.sampling import (
    apply_repetition_penalty,
    filter_top_k_top_p,
    make_generator,
    next_token,
)
from oai_audio_server.engine.types import SamplingParams


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert next_token(logits, SamplingParams(max_tokens=1, temperature=0.0),
                      seen_ids=None, generator=None) == 1


def test_repetition_penalty_matches_transformers_rule() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_top_k_and_top_p_keep_the_expected_tokens() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=0.5))
    assert kept.tolist() == [True, False, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=0.79))
    assert kept.tolist() == [True, True, False, False]


def test_seeded_sampling_repeats_and_differs_by_seed() -> None:
    logits = torch.zeros(1000)
    device = torch.device("cpu")

    def draw(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=1, temperature=1.0, seed=seed)
        generator = make_generator(params, device)
        return [next_token(logits, params, seen_ids=None, generator=generator) for _ in range(8)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_coalesce_joins_adjacent_text_only() -> None:
    from oai_audio_server.engine.types import Finished, TextDelta, coalesce

    end = Finished("stop", 1, 2)
    assert coalesce([TextDelta("a"), TextDelta("b"), end, TextDelta("c")]) == [
        TextDelta("ab"), end, TextDelta("c")
    ]
    assert coalesce([]) == []

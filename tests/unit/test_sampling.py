from __future__ import annotations

import math

import torch

from oai_audio_server.engine.sampling import (
    BatchSampler,
    RowSpec,
    _filter_top_k,
    _filter_top_p,
    choice_seed,
    exponentials,
)
from oai_audio_server.engine.types import SamplingParams

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def sampler_with(*params: SamplingParams, vocab: int, prompts: list[list[int]] | None = None,
                 capacity: int = 8) -> BatchSampler:
    sampler = BatchSampler(capacity, vocab, CPU)
    sampler.add_rows(0, [RowSpec(p, prompts[i] if prompts else []) for i, p in enumerate(params)])
    return sampler


def step(sampler: BatchSampler, logits: torch.Tensor) -> list[int]:
    return sampler.sample(logits).to_host().tokens


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert step(sampler_with(GREEDY, GREEDY, vocab=4), logits) == [1, 0]


def test_repetition_penalty_matches_transformers_rule() -> None:
    # Seen ids' scores are divided by the penalty (multiplied when negative).
    penalised = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=2.0)
    batch = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0], [-1.0, -1.5, -3.0]])
    sampler = sampler_with(penalised, GREEDY, penalised, vocab=3, prompts=[[0], [0], [0]])
    # Row 0: 2.0/2 = 1.0 < 1.5; row 2: -1.0*2 = -2.0 < -1.5.
    assert step(sampler, batch) == [1, 0, 1]
    # The answer so far counts too: rows 0 and 2 chose 1, so 0 and 1 are both penalised.
    assert step(sampler, torch.tensor([[2.0, 1.5, 1.2]] * 3)) == [2, 0, 2]


def test_presence_and_frequency_penalties_follow_openai() -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, presence_penalty=0.5,
                            frequency_penalty=0.3, logprobs=True)
    sampler = sampler_with(params, vocab=3)
    logits = torch.tensor([[1.0, 0.0, -5.0]])
    assert step(sampler, logits) == [0]
    assert step(sampler, logits) == [0]  # 1.0 - 0.3 - 0.5 = 0.2 > 0
    # Twice chosen: 1.0 - 2*0.3 - 0.5 = -0.1 < 0, so token 1 wins; the reported log
    # probability is of the penalised distribution.
    host = sampler.sample(logits).to_host()
    assert host.tokens == [1]
    expected = torch.tensor([-0.1, 0.0, -5.0]).log_softmax(0)[1].item()
    lp = host.logprobs[0]
    assert lp is not None and math.isclose(lp.logprob, expected, rel_tol=1e-5)


def test_logit_bias_bans_and_forces_tokens_per_row() -> None:
    ban = SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((1, -100.0),))
    force = SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((3, 500.0),))
    logits = torch.tensor([[0.0, 9.0, 8.0, 0.0]] * 3)
    # The second bias is clamped to 100 and still wins; the plain row is untouched.
    assert step(sampler_with(ban, force, GREEDY, vocab=4), logits) == [2, 3, 1]


def test_top_k_and_top_p_per_row() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    kept = torch.isfinite(_filter_top_k(logits, torch.tensor([2, 0, 1])))
    assert kept.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    kept = torch.isfinite(_filter_top_p(logits, torch.tensor([0.5, 0.79, 1.0]), sorted_=True))
    assert kept.tolist() == [
        [True, False, False, False], [True, True, False, False], [True] * 4
    ]


def draws(params: SamplingParams, probs: torch.Tensor, times: int) -> list[int]:
    sampler = sampler_with(params, vocab=probs.shape[0])
    counts = [0] * probs.shape[0]
    for _ in range(times):
        counts[step(sampler, torch.log(probs)[None, :])[0]] += 1
    return counts


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    counts = draws(SamplingParams(max_tokens=1, temperature=1.0, seed=0), probs, 2000)
    assert counts[3] == 0
    assert 1250 < counts[0] < 1550 and 280 < counts[1] < 520 and 120 < counts[2] < 280
    # Through the top-k candidates path: the same law on the survivors.
    counts = draws(SamplingParams(max_tokens=1, temperature=1.0, seed=1, top_k=2), probs, 2000)
    assert counts[2] == counts[3] == 0
    assert 1400 < counts[0] < 1700  # 0.7 / 0.9 of 2000 = 1556
    # top_p 0.75 keeps 0.7 and 0.2 (the first alone does not reach it).
    counts = draws(SamplingParams(max_tokens=1, temperature=1.0, seed=2, top_p=0.75), probs, 2000)
    assert counts[2] == counts[3] == 0 and counts[1] > 300


def test_exponentials_are_exp1_and_keyed_by_seed_step_and_token() -> None:
    seeds = torch.tensor([5, 5, 6])
    steps = torch.tensor([0, 1, 0])
    values = exponentials(seeds, steps, torch.arange(20000))
    assert abs(values.mean().item() - 1.0) < 0.03
    assert (values > 0).all()
    assert not torch.equal(values[0], values[1]) and not torch.equal(values[0], values[2])
    again = exponentials(seeds[:1], steps[:1], torch.arange(5, 10))
    assert torch.equal(again[0], values[0, 5:10])


def test_seeded_rows_repeat_whatever_else_is_in_the_batch() -> None:
    logits = torch.zeros(4, 1000)

    def run(seed: int, neighbours: int) -> list[int]:
        seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=seed)
        others = [SamplingParams(max_tokens=1, temperature=0.7, seed=99, top_k=5)] * neighbours
        sampler = sampler_with(*others, seeded, GREEDY, vocab=1000)
        return [step(sampler, logits[: neighbours + 2])[neighbours] for _ in range(8)]

    assert run(1, 0) == run(1, 2)
    assert run(1, 0) != run(2, 0)


def test_a_moved_row_keeps_its_state() -> None:
    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=3, presence_penalty=1.0)
    logits = torch.zeros(1, 50)
    alone = sampler_with(seeded, vocab=50)
    expected = [step(alone, logits) for _ in range(6)]
    # The same row behind a neighbour that leaves after two steps: it moves to index 0.
    sampler = sampler_with(GREEDY, seeded, vocab=50)
    got = [step(sampler, torch.zeros(2, 50))[1:] for _ in range(2)]
    sampler.move(1, 0)
    sampler.clear_from(1)
    got += [step(sampler, logits) for _ in range(4)]
    assert got == expected


def test_top_logprobs_are_the_largest_in_order() -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=2)
    plain = SamplingParams(max_tokens=1, temperature=0.0)
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]] * 2)
    host = sampler_with(params, plain, vocab=4).sample(logits).to_host()
    lp = host.logprobs[0]
    reference = logits[0].log_softmax(0)
    assert lp is not None and lp.token_id == 1
    assert [t for t, _ in lp.top] == [1, 2]
    assert math.isclose(lp.top[1][1], reference[2].item(), rel_tol=1e-5)
    assert host.logprobs[1] is None


def test_a_top_k_beyond_any_tensor_keeps_every_token_and_fails_nobody() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 2))
    huge = SamplingParams(max_tokens=1, temperature=1.0, top_k=2**64, seed=1)
    sampler = sampler_with(huge, GREEDY, vocab=3)  # building the tensors does not overflow
    assert step(sampler, logits)[1] == 0


def test_choices_get_distinct_reproducible_seeds() -> None:
    seeds = [choice_seed(42, i) for i in range(8)]
    assert seeds[0] == 42 and len(set(seeds)) == 8
    assert seeds == [choice_seed(42, i) for i in range(8)]
    assert all(-(2**63) <= s < 2**63 for s in seeds)


def test_coalesce_joins_adjacent_text_only() -> None:
    from oai_audio_server.engine.types import Finished, TextDelta, coalesce

    end = Finished("stop", 1, 2)
    assert coalesce([TextDelta("a"), TextDelta("b"), end, TextDelta("c")]) == [
        TextDelta("ab"), end, TextDelta("c")
    ]
    assert coalesce([]) == []


def test_the_device_mask_path_equals_xgrammars_kernel() -> None:
    """What a GPU runs (bits unpacked by tensor ops) against xgrammar's CPU kernel."""
    from oai_audio_server.engine.grammar import apply_bitmask, mask_with_bits

    generator = torch.Generator().manual_seed(0)
    vocab, rows = 100, 5
    logits = torch.randn(rows, vocab, generator=generator)
    bits = torch.randint(-(2**31), 2**31 - 1, (rows, 4), dtype=torch.int32, generator=generator)
    offsets = [1, 3, 4]
    index = torch.tensor(offsets)
    by_xgrammar = apply_bitmask(logits, bits, offsets, index, owned=False)
    by_tensors = mask_with_bits(logits, bits.index_select(0, index), index)
    assert torch.equal(by_xgrammar, by_tensors)
    assert torch.isinf(by_tensors[1]).any() and not torch.isinf(by_tensors[0]).any()
    # Bit t%32 of word t//32 allows token t.
    word, bit = divmod(37, 32)
    assert torch.isfinite(by_tensors[3, 37]) == bool((int(bits[3, word]) >> bit) & 1)
    assert not torch.isinf(logits).any()  # not owned: the input is untouched

"""Choosing the next token of every row of a batch at once, on the model's device.

Each row keeps its own parameters (temperature, top-p, top-k, repetition penalty, seed).
Semantics follow transformers' logits processors in their order (repetition penalty,
temperature, top-k, top-p), so answers match ``model.generate`` with the same settings;
greedy rows (temperature 0) take the argmax, as ``model.chat`` does with do_sample off.

Nothing here reads a value back to the host: the chosen ids stay on the device until the
engine copies the whole step's ids back at once. A sampled row draws from its own
``torch.Generator`` (seeded rows are reproducible whatever else is in the batch) by the
exponential-race method: argmax(p / E) with E ~ Exp(1) picks each token with probability
p, with no cumulative sums and no sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from oai_audio_server.engine.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


TOP_K_LIMIT = 2**31 - 1


@dataclass
class RowSampling:
    params: SamplingParams
    generator: torch.Generator | None
    # Ids the repetition penalty applies to (prompt and answer so far), on the device;
    # None when the row has no penalty.
    seen: torch.Tensor | None


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """``logits`` [vocab] of one row; scores of seen ids are divided (or, when negative,
    multiplied) by ``penalty``."""
    scores = logits.gather(0, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen_ids, scores)


def filter_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab]; per-row ``top_k`` [rows] (0 = off)."""
    vocab = logits.shape[-1]
    k = top_k.clamp(min=0, max=vocab)
    ordered = torch.sort(logits, dim=-1, descending=True).values
    threshold = ordered.gather(1, (k - 1).clamp(min=0)[:, None])
    drop = (logits < threshold) & (k > 0)[:, None]
    return logits.masked_fill(drop, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities add up to ``top_p`` [rows] (the
    most likely one always stays)."""
    ordered, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)[:, None]
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class SamplingPlan:
    """The parameter tensors of one batch composition, built once per composition (not
    per step: building them copies from the host, which waits for the device)."""

    def __init__(self, rows: Sequence[RowSampling], device: torch.device) -> None:
        self.penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        self.sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        self.generators = [rows[i].generator for i in self.sampled]
        params = [rows[i].params for i in self.sampled]
        self.sampled_index = torch.tensor(self.sampled, dtype=torch.long, device=device)
        self.temperature = torch.tensor([p.temperature for p in params], device=device)
        # A top-k past the vocabulary keeps everything; clamped so any int fits the tensor.
        self.top_k = torch.tensor(
            [min(max(p.top_k, 0), TOP_K_LIMIT) for p in params], dtype=torch.long, device=device
        )
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.any_top_k = any(p.top_k > 0 for p in params)
        self.any_top_p = any(p.top_p < 1.0 for p in params)


def sample(logits: torch.Tensor, rows: Sequence[RowSampling], plan: SamplingPlan) -> torch.Tensor:
    """``logits`` float32 [rows, vocab] -> chosen ids [rows] (on the device)."""
    if plan.penalised:
        logits = logits.clone()
        for i in plan.penalised:
            seen = rows[i].seen
            if seen is not None and seen.numel():
                logits[i] = apply_repetition_penalty(
                    logits[i], seen, rows[i].params.repetition_penalty
                )
        # An extreme penalty can push scores to +-inf; keep them ordered and finite.
        limit = torch.finfo(logits.dtype).max
        logits = torch.nan_to_num(logits, nan=-limit, posinf=limit, neginf=-limit)
    chosen = logits.argmax(dim=-1)
    if not plan.sampled:
        return chosen
    scores = logits.index_select(0, plan.sampled_index)
    # Shift so the best score is 0 before dividing: a tiny temperature then sends the
    # others to -inf instead of overflowing every score to inf (and the softmax to NaN).
    scores = (scores - scores.max(dim=-1, keepdim=True).values) / plan.temperature[:, None]
    if plan.any_top_k:
        scores = filter_top_k(scores, plan.top_k)
    if plan.any_top_p:
        scores = filter_top_p(scores, plan.top_p)
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs)
    for j, generator in enumerate(plan.generators):
        race[j].exponential_(generator=generator)
    picks = (probs / race.clamp_min(1e-30)).argmax(dim=-1)
    return chosen.index_copy(0, plan.sampled_index, picks)

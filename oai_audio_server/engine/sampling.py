"""Choosing the next token of one sequence, with that sequence's own parameters.

Semantics follow transformers' logits processors (repetition penalty, temperature,
top-k, top-p) so that answers match ``model.generate`` with the same settings; greedy
(temperature 0) is a plain argmax, which is what ``model.chat`` does with do_sample=False.
"""

from __future__ import annotations

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


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    scores = logits.gather(0, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen_ids, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        k = min(top_k, logits.numel())
        threshold = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted[-1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(0, sorted_index, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    seen_ids: torch.Tensor | None,
    generator: torch.Generator | None,
) -> int:
    """``logits``: float32 scores over the decodable vocabulary for one sequence."""
    if params.repetition_penalty != 1.0 and seen_ids is not None and seen_ids.numel():
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
        # An extreme penalty can push scores to +-inf; keep them ordered and finite.
        limit = torch.finfo(logits.dtype).max
        logits = torch.nan_to_num(logits, nan=-limit, posinf=limit, neginf=-limit)
    if params.greedy or generator is None:
        return int(torch.argmax(logits).item())
    # Shift so the best score is 0 before dividing: a tiny temperature then sends the
    # others to -inf instead of overflowing every score to inf (and the softmax to NaN).
    logits = (logits - logits.max()) / params.temperature
    logits = filter_top_k_top_p(logits, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())

"""Choosing the next token of every row of a batch at once, on the model's device.

Design
------
One ``BatchSampler`` per engine holds every row's sampling parameters as tensors of a
fixed capacity (the engine's largest batch) on the device, so a step never copies
parameters from the host and a CUDA graph could one day capture it. Rows are known by
their index in the batch, exactly like ``DeviceRows`` in batch.py:

* ``add_rows(start, rows)``: rows ``start..`` join (after their prefill); their parameters
  are written with one host-to-device copy per tensor.
* ``move(source, target)``: row ``source`` takes index ``target`` (rows compact: when row
  i leaves, the last row moves into i). Every per-row tensor moves, as do the host-side
  grammar matchers and flags.
* ``clear_from(start)``: rows ``start..`` are gone.
* ``sample(logits, start=0) -> SampledStep``: one step for rows ``start..start+n-1``
  (``logits`` float [n, vocab]). Nothing is read back; the chosen ids stay on the device.
* ``SampledStep.to_host() -> HostStep``: the step's one copy to the host (ids, and log
  probabilities when a row asked), which also advances the rows' grammar matchers.

The order of logit processing is transformers' (so answers match ``model.generate``),
with OpenAI's extras in between:
1. repetition penalty over the prompt and the answer so far (transformers' rule: a seen
   token's score is divided by the penalty, or multiplied when negative);
2. presence and frequency penalties over the answer so far (OpenAI's formula:
   ``logit -= count * frequency + (count > 0) * presence``) from a per-row
   ``counts [rows, vocab]`` tensor that each step's ids are added to on the device;
3. ``logit_bias`` as a sparse per-row scatter-add (ids, values), clamped to -100..100;
4. the grammar mask (structured outputs, see grammar.py): filled on the host by each
   row's matcher while the device still computes the forward pass, applied here;
5. log probabilities, when a row asked, are taken HERE: the log-softmax of the logits
   after penalties, bias and grammar, before temperature, top-k and top-p (the model's
   distribution as the request shaped it, independent of how it is sampled);
6. greedy rows take the argmax (exact); sampled rows: temperature, top-k (``torch.topk``
   of the batch's largest k, never a full sort), top-p (on the top-k survivors, or a
   full sort only when a row asks for top-p without top-k), then one draw.

Randomness: no ``torch.Generator`` per row. One batched draw per step: a counter-based
hash (splitmix64, in int64 tensor ops) of (row seed, the row's generated-token index,
token id) gives a uniform per candidate token, turned into an exponential race
``argmax(p / E)`` (picks each token with probability p, no cumulative sum, no sync).
A row's draw depends only on its own seed, step and probabilities, so a seeded row gives
the same answer whatever else is in the batch; unseeded rows get a random 63-bit seed
from the host when they join.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from oai_audio_server.engine.types import SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit)
LOGIT_BIAS_LIMIT = 100.0
# What JSON can carry for a token the mask or a penalty ruled out (OpenAI's value).
LOGPROB_FLOOR = -9999.0
# top_k above this is sampled over the full vocabulary (topk of a huge k is a sort).
TOPK_CANDIDATES_LIMIT = 1024

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's is arithmetic on signed values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser; int64 products wrap, as uint64 ones do."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def _mix_int(value: int) -> int:
    x = value & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request with ``n`` > 1: every choice is
    reproducible, and choices of one request differ."""
    if index == 0:
        return seed
    return _signed(_mix_int(seed + _mix_int(index + 0x9E3779B97F4A7C15)))


def exponentials(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """E ~ Exp(1) per (row, candidate): ``seeds``/``steps`` int64 [rows], ``token_ids``
    int64 [rows, candidates] or [candidates]."""
    base = _mix(_mix(seeds + _GOLDEN) ^ (steps * _GOLDEN))
    bits = _shift_right(_mix(base[:, None] + (token_ids + 1) * _GOLDEN), 40)  # 24 bits
    uniform = (bits.float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(uniform)


@dataclass
class RowSampling:
    """Host-side state of one row: its parameters, grammar matcher and the log
    probabilities not yet handed to its client (they go with the next text)."""

    params: SamplingParams
    seed: int  # the request's seed, or a random one drawn when the row first joined
    grammar: Any = None  # an xgrammar GrammarMatcher, or None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class _Flags:
    """What the rows of one slice ask for, computed once per batch composition."""

    repetition: bool
    counted: bool  # presence or frequency penalty
    bias: bool
    sampled: torch.Tensor | None  # row offsets of sampled rows; None when all greedy
    all_sampled: bool
    top_k: int  # the largest k of the sampled rows; 0 if any row has none
    any_top_k: bool
    any_top_p: bool
    top_logprobs: int  # the largest top_logprobs; -1 when no row wants log probabilities
    grammar_rows: tuple[int, ...]
    grammar_index: torch.Tensor | None  # grammar_rows on the device


@dataclass
class HostStep:
    """One step on the host: the chosen ids, and per row its log probabilities (None
    for rows that did not ask)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]


class SampledStep:
    def __init__(
        self, sampler: BatchSampler, start: int, ids: torch.Tensor,
        packed: torch.Tensor | None, top: int, grammar_rows: tuple[int, ...],
    ) -> None:
        self.ids = ids  # [n] on the device, for the next decode step's input
        self._sampler = sampler
        self._start = start
        self._packed = packed
        # Who asked for log probabilities, as of this step: the rows may move before the
        # step is read (an overlapped step is read after the batch was compacted).
        self._params = (
            [sampler.params_at(start + offset) for offset in range(ids.shape[0])]
            if packed is not None else []
        )
        self._top = top
        self._grammar_rows = grammar_rows

    def to_host(self) -> HostStep:
        """The step's one wait for the device."""
        sampler = self._sampler
        count = self.ids.shape[0]
        if self._packed is None:
            tokens = self.ids.tolist()
            logprobs: list[TokenLogprob | None] = [None] * count
        else:
            values = self._packed.tolist()
            tokens = [int(row[0]) for row in values]
            logprobs = []
            top = self._top
            for offset, row in enumerate(values):
                params = self._params[offset]
                if params is None or not params.logprobs:
                    logprobs.append(None)
                    continue
                keep = min(params.top_logprobs, top)
                pairs = tuple(
                    (int(row[2 + top + j]), max(row[2 + j], LOGPROB_FLOOR)) for j in range(keep)
                )
                logprobs.append(TokenLogprob(int(row[0]), max(row[1], LOGPROB_FLOOR), pairs))
        sampler.advance_grammars(self._start, self._grammar_rows, tokens)
        return HostStep(tokens, logprobs)


@dataclass(frozen=True)
class RowSpec:
    """A row joining the batch."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    grammar: Any = None  # a compiled grammar (grammar.py), when the row has one
    # A row coming back after a preemption: its host state (seed, grammar matcher where
    # it stopped, log probabilities not yet sent) and the tokens it generated, from which
    # its step count and token counts are rebuilt, so its answer goes on as if never
    # interrupted.
    resume: RowSampling | None = None
    generated: Sequence[int] = ()


class BatchSampler:
    """Per-row sampling state for up to ``capacity`` rows; see the module docstring."""

    def __init__(self, capacity: int, vocab: int, device: torch.device) -> None:
        self.capacity = capacity
        self.vocab = vocab
        self.device = device
        zeros = torch.zeros
        self.temperature = torch.ones(capacity, device=device)
        self.top_k = zeros(capacity, dtype=torch.long, device=device)
        self.top_p = torch.ones(capacity, device=device)
        self.repetition = torch.ones(capacity, device=device)
        self.presence = zeros(capacity, device=device)
        self.frequency = zeros(capacity, device=device)
        self.seeds = zeros(capacity, dtype=torch.long, device=device)
        self.steps = zeros(capacity, dtype=torch.long, device=device)
        # Allocated at full capacity the first time a row needs them (most servers never
        # see a penalty or a logit_bias; the full-size vocabulary makes them ~0.6 MB a row).
        self.counts: torch.Tensor | None = None  # int32 [capacity, vocab]
        self.prompt_seen: torch.Tensor | None = None  # bool [capacity, vocab]
        self.bias_ids: torch.Tensor | None = None  # int64 [capacity, MAX_LOGIT_BIAS]
        self.bias_values: torch.Tensor | None = None  # float [capacity, MAX_LOGIT_BIAS]
        self._rows: list[RowSampling | None] = [None] * capacity
        self._flags: dict[tuple[int, int], _Flags] = {}
        self._bitmask: torch.Tensor | None = None  # int32 host [capacity, words]

    # ------------------------------------------------------------ composition

    def params_at(self, index: int) -> SamplingParams | None:
        row = self._rows[index]
        return row.params if row is not None else None

    def row(self, index: int) -> RowSampling | None:
        return self._rows[index]

    def add_rows(self, start: int, specs: Sequence[RowSpec]) -> list[RowSampling]:
        """Rows ``start..start+len(specs)-1`` join; returns their host-side state."""
        end = start + len(specs)
        params = [spec.params for spec in specs]
        device = self.device

        def put(tensor: torch.Tensor, values: list[Any]) -> None:
            tensor[start:end] = torch.tensor(values, dtype=tensor.dtype).to(device)

        put(self.temperature, [1.0 if p.greedy else p.temperature for p in params])
        put(self.top_k, [min(max(p.top_k, 0), 2**62) for p in params])
        put(self.top_p, [p.top_p for p in params])
        put(self.repetition, [p.repetition_penalty for p in params])
        put(self.presence, [p.presence_penalty for p in params])
        put(self.frequency, [p.frequency_penalty for p in params])
        rows = [
            spec.resume if spec.resume is not None else RowSampling(
                spec.params,
                spec.params.seed if spec.params.seed is not None else secrets.randbits(63),
                _matcher(spec.grammar),
            )
            for spec in specs
        ]
        put(self.seeds, [row.seed for row in rows])
        put(self.steps, [len(spec.generated) for spec in specs])
        if self.counts is not None:
            self.counts[start:end] = 0
        if any(_needs_counts(p) for p in params):
            self._ensure_counts()
        if self.counts is not None:
            for offset, spec in enumerate(specs):
                if spec.generated:
                    ids = torch.tensor(list(spec.generated), dtype=torch.long)
                    ids = ids[(ids >= 0) & (ids < self.vocab)]
                    self.counts[start + offset] = torch.bincount(
                        ids, minlength=self.vocab
                    ).to(self.counts.dtype).to(device)
        if any(p.repetition_penalty != 1.0 for p in params):
            self._ensure_prompt_seen()
        if self.prompt_seen is not None:
            self.prompt_seen[start:end] = False
            for offset, spec in enumerate(specs):
                if spec.params.repetition_penalty != 1.0 and spec.prompt_ids:
                    ids = torch.tensor(list(spec.prompt_ids), dtype=torch.long)
                    ids = ids[(ids >= 0) & (ids < self.vocab)].to(device)
                    self.prompt_seen[start + offset, ids] = True
        if any(p.logit_bias for p in params):
            self._ensure_bias()
        if self.bias_ids is not None and self.bias_values is not None:
            ids_rows = [[0] * MAX_LOGIT_BIAS for _ in params]
            value_rows = [[0.0] * MAX_LOGIT_BIAS for _ in params]
            for offset, p in enumerate(params):
                usable = [(t, v) for t, v in p.logit_bias if 0 <= t < self.vocab]
                for j, (token, value) in enumerate(usable[:MAX_LOGIT_BIAS]):
                    ids_rows[offset][j] = token
                    value_rows[offset][j] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, value))
            put(self.bias_ids, ids_rows)
            put(self.bias_values, value_rows)
        self._rows[start:end] = rows
        self._flags.clear()
        return rows

    def move(self, source: int, target: int) -> None:
        tensors = [self.temperature, self.top_k, self.top_p, self.repetition, self.presence,
                   self.frequency, self.seeds, self.steps]
        for optional in (self.counts, self.prompt_seen, self.bias_ids, self.bias_values):
            if optional is not None:
                tensors.append(optional)
        for tensor in tensors:
            tensor[target] = tensor[source]
        self._rows[target] = self._rows[source]
        self._rows[source] = None
        self._flags.clear()

    def clear_from(self, start: int) -> None:
        for index in range(start, self.capacity):
            self._rows[index] = None
        self._flags.clear()

    def _ensure_counts(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(
                self.capacity, self.vocab, dtype=torch.int32, device=self.device
            )

    def _ensure_prompt_seen(self) -> None:
        self._ensure_counts()  # the penalty also covers the answer so far
        if self.prompt_seen is None:
            self.prompt_seen = torch.zeros(
                self.capacity, self.vocab, dtype=torch.bool, device=self.device
            )

    def _ensure_bias(self) -> None:
        if self.bias_ids is None:
            shape = (self.capacity, MAX_LOGIT_BIAS)
            self.bias_ids = torch.zeros(shape, dtype=torch.long, device=self.device)
            self.bias_values = torch.zeros(shape, device=self.device)

    def flags(self, start: int, count: int) -> _Flags:
        key = (start, count)
        cached = self._flags.get(key)
        if cached is not None:
            return cached
        params = [self.params_at(i) or SamplingParams(1, 0.0) for i in range(start, start + count)]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        sampled_params = [params[i] for i in sampled]
        wants = [p.top_logprobs for p in params if p.logprobs]
        grammar_rows = tuple(
            i for i in range(count) if (r := self._rows[start + i]) and r.grammar is not None
        )
        flags = _Flags(
            repetition=any(p.repetition_penalty != 1.0 for p in params),
            counted=any(p.presence_penalty or p.frequency_penalty for p in params),
            bias=any(p.logit_bias for p in params),
            sampled=(torch.tensor(sampled, dtype=torch.long, device=self.device)
                     if sampled else None),
            all_sampled=len(sampled) == count,
            top_k=(max(p.top_k for p in sampled_params)
                   if sampled_params and all(p.top_k > 0 for p in sampled_params) else 0),
            any_top_k=any(p.top_k > 0 for p in sampled_params),
            any_top_p=any(p.top_p < 1.0 for p in sampled_params),
            top_logprobs=min(max(wants), MAX_TOP_LOGPROBS) if wants else -1,
            grammar_rows=grammar_rows,
            grammar_index=(torch.tensor(grammar_rows, dtype=torch.long, device=self.device)
                           if grammar_rows else None),
        )
        self._flags[key] = flags
        return flags

    # ------------------------------------------------------------ grammar

    def _grammar_mask(self, start: int, flags: _Flags) -> torch.Tensor | None:
        """Each grammar row's allowed tokens as a bitmask, filled on the host (the
        device is still busy with the forward pass), then sent in one copy."""
        if not flags.grammar_rows:
            return None
        from oai_audio_server.engine.grammar import fill_bitmask, new_bitmask

        if self._bitmask is None:
            self._bitmask = new_bitmask(self.capacity, self.vocab, self.device)
        matchers = [self._rows[start + i].grammar for i in flags.grammar_rows]  # type: ignore[union-attr]
        fill_bitmask(self._bitmask, matchers, flags.grammar_rows)
        return self._bitmask

    def advance_grammars(self, start: int, rows: tuple[int, ...], tokens: list[int]) -> None:
        """The grammar rows' matchers take the step's tokens (offsets from ``start``)."""
        for offset in rows:
            row = self._rows[start + offset]
            if row is not None and row.grammar is not None and not row.grammar.is_terminated():
                if not row.grammar.accept_token(tokens[offset]):
                    logger.warning("grammar refused token %d it allowed", tokens[offset])

    # ------------------------------------------------------------ the step

    def sample(self, logits: torch.Tensor, start: int = 0) -> SampledStep:
        """``logits`` float [n, vocab] of rows ``start..start+n-1``."""
        count = logits.shape[0]
        flags = self.flags(start, count)
        rows = slice(start, start + count)
        mask = self._grammar_mask(start, flags)
        x = logits.float()
        processed = False
        if flags.repetition and self.prompt_seen is not None and self.counts is not None:
            penalty = self.repetition[rows][:, None]
            seen = self.prompt_seen[rows] | (self.counts[rows] > 0)
            x = torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)
            processed = True
        if flags.counted and self.counts is not None:
            counts = self.counts[rows].float()
            x = (x - counts * self.frequency[rows][:, None]
                 - (counts > 0).float() * self.presence[rows][:, None])
            processed = True
        if flags.bias and self.bias_ids is not None and self.bias_values is not None:
            x = x.scatter_add(1, self.bias_ids[rows], self.bias_values[rows])
            processed = True
        if processed:
            # An extreme penalty can push scores to +-inf; keep them ordered and finite.
            limit = torch.finfo(x.dtype).max
            x = torch.nan_to_num(x, nan=-limit, posinf=limit, neginf=-limit)
        if mask is not None and flags.grammar_index is not None:
            x = _apply_mask(x, mask, flags, owned=processed or x is not logits)
        ids = x.argmax(dim=-1)
        if flags.sampled is not None:
            ids = self._draw(x, ids, start, count, flags)
        if self.counts is not None:
            self.counts[rows].scatter_add_(
                1, ids[:, None], torch.ones(count, 1, dtype=torch.int32, device=self.device)
            )
        self.steps[rows] += 1
        packed = None
        top = max(flags.top_logprobs, 0)
        if flags.top_logprobs >= 0:
            logprobs = x.log_softmax(dim=-1)
            parts = [ids[:, None].double(), logprobs.gather(1, ids[:, None]).double()]
            if top:
                values, indices = logprobs.topk(top, dim=-1)
                parts += [values.double(), indices.double()]
            packed = torch.cat(parts, dim=1)
        return SampledStep(self, start, ids, packed, top, flags.grammar_rows)

    def _draw(
        self, x: torch.Tensor, greedy_ids: torch.Tensor, start: int, count: int, flags: _Flags
    ) -> torch.Tensor:
        index = flags.sampled
        assert index is not None
        rows = slice(start, start + count)

        def per_row(tensor: torch.Tensor) -> torch.Tensor:
            values = tensor[rows]
            return values if flags.all_sampled else values.index_select(0, index)

        scores = x if flags.all_sampled else x.index_select(0, index)
        # Shift so the best score is 0 before dividing: a tiny temperature then sends the
        # others to -inf instead of overflowing every score to inf (and the softmax to NaN).
        temperature = per_row(self.temperature)[:, None]
        scores = (scores - scores.max(dim=-1, keepdim=True).values) / temperature
        top_k = per_row(self.top_k)
        candidates: torch.Tensor | None = None
        if 0 < flags.top_k <= min(TOPK_CANDIDATES_LIMIT, self.vocab):
            # Every sampled row keeps at most k tokens: work on the batch's top k only.
            scores, candidates = scores.topk(flags.top_k, dim=-1)
            beyond = torch.arange(flags.top_k, device=x.device)[None, :] >= top_k[:, None]
            scores = scores.masked_fill(beyond, float("-inf"))
        elif flags.any_top_k:
            scores = _filter_top_k(scores, top_k)
        if flags.any_top_p:
            scores = _filter_top_p(scores, per_row(self.top_p), sorted_=candidates is not None)
        probs = scores.softmax(dim=-1)
        token_ids = candidates if candidates is not None else torch.arange(
            self.vocab, device=x.device
        ).expand(probs.shape[0], -1)
        race = exponentials(per_row(self.seeds), per_row(self.steps), token_ids)
        picks = (probs / race).argmax(dim=-1)
        if candidates is not None:
            picks = candidates.gather(1, picks[:, None])[:, 0]
        if flags.all_sampled:
            return picks
        return greedy_ids.index_copy(0, index, picks)


def _needs_counts(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0)


def _matcher(compiled: Any) -> Any:
    if compiled is None:
        return None
    from oai_audio_server.engine.grammar import new_matcher

    return new_matcher(compiled)


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, flags: _Flags, *, owned: bool) -> torch.Tensor:
    from oai_audio_server.engine.grammar import apply_bitmask

    assert flags.grammar_index is not None
    return apply_bitmask(x, mask, list(flags.grammar_rows), flags.grammar_index, owned=owned)


def _filter_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Per-row ``top_k`` [rows] (0 = off) over the full vocabulary; the threshold comes
    from one ``topk`` of the batch's largest bounded k (or a sort past that)."""
    vocab = scores.shape[-1]
    k = top_k.clamp(min=0, max=vocab)
    largest = int(k.max())  # a host read; only on this rare path (huge or mixed k)
    ordered = scores.topk(largest, dim=-1).values if largest else scores
    threshold = ordered.gather(1, (k - 1).clamp(min=0)[:, None])
    drop = (scores < threshold) & (k > 0)[:, None]
    return scores.masked_fill(drop, float("-inf"))


def _filter_top_p(scores: torch.Tensor, top_p: torch.Tensor, *, sorted_: bool) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities add up to ``top_p`` [rows] (the
    most likely one always stays): a token goes when the ones before it already reach
    top_p. ``sorted_``: ``scores`` are already in descending order (top-k survivors)."""
    if sorted_:
        ordered, order = scores, None
    else:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    drop = before >= top_p[:, None]
    drop[:, 0] = False
    if order is not None:
        drop = drop.scatter(1, order, drop)
    return scores.masked_fill(drop, float("-inf"))

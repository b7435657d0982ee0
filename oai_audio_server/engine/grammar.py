"""Structured outputs: JSON grammars compiled with xgrammar, applied as token masks.

* The tokenizer information comes from the family's own vocabulary (``token_bytes``:
  Qwen-Audio's tiktoken ranks, Qwen2-Audio's ``tokenizer.json``), as raw bytes. Special
  tokens get an empty entry, which xgrammar treats as "never inside the output", so an
  audio or control token can never appear in a JSON string; the stop tokens are named.
* A grammar is compiled once per (kind, schema) and cached (``GrammarCache``): the chat
  service compiles it on a worker thread while it prepares the request (a schema the
  library cannot honour is a 400 there, before anything is queued), and the engine asks
  again when the row joins, which is then a cache hit. An engine in another process has
  its own cache; ``prefetch`` starts the compile on a thread when the request is queued,
  so the step loop finds it done.
* Whitespace is never free: ``any_whitespace=False`` and the separators ``,`` and ``:``
  give compact JSON, so even a random-weight model reaches the end of a small schema
  in a few dozen tokens. Properties come in the schema's order.
* Each step, every grammar row's matcher fills its row of a host bitmask (while the
  device still computes the forward pass) and disallowed tokens get -inf before
  sampling (see sampling.py): on a CPU by xgrammar's own kernel, on a GPU after one copy
  by a few tensor ops. After the step the matchers accept the
  chosen tokens.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from oai_audio_server.engine.types import GrammarSpec
from oai_audio_server.errors import InvalidRequestError

CACHE_ENTRIES = 128
COMPACT = (",", ":")  # item and key separators: no whitespace anywhere in the output


class GrammarCache:
    """Compiled grammars of one vocabulary, by spec; safe to use from any thread."""

    def __init__(
        self, token_bytes: Sequence[bytes], special_ids: Iterable[int], stop_ids: Iterable[int],
    ) -> None:
        self._token_bytes = token_bytes
        self._special_ids = frozenset(special_ids)
        self._stop_ids = sorted(stop_ids)
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._entries: collections.OrderedDict[GrammarSpec, Future[Any]] = (
            collections.OrderedDict()
        )
        self._pool: ThreadPoolExecutor | None = None

    def _get_compiler(self) -> Any:
        import xgrammar

        with self._lock:
            if self._compiler is None:
                vocab = [b"" if i in self._special_ids else token
                         for i, token in enumerate(self._token_bytes)]
                info = xgrammar.TokenizerInfo(
                    vocab, xgrammar.VocabType.RAW, vocab_size=len(vocab),
                    stop_token_ids=self._stop_ids,
                )
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (blocks while it compiles); a schema the library cannot
        honour is an InvalidRequestError naming what it refused."""
        with self._lock:
            future = self._entries.get(spec)
            owner = future is None
            if future is None:
                future = Future()
                self._entries[spec] = future
                while len(self._entries) > CACHE_ENTRIES:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(spec)
        if owner:
            try:
                future.set_result(_compile(self._get_compiler(), spec))
            except BaseException as exc:
                with self._lock:  # not cached: the next request gets its own message
                    if self._entries.get(spec) is future:
                        del self._entries[spec]
                future.set_exception(exc)
        return future.result()

    def prefetch(self, spec: GrammarSpec) -> None:
        """Start compiling on a worker thread (errors surface in compile())."""
        with self._lock:
            if spec in self._entries:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="oas-grammar")
            pool = self._pool
        pool.submit(self._compile_quietly, spec)

    def _compile_quietly(self, spec: GrammarSpec) -> None:
        try:
            self.compile(spec)
        except Exception:  # reported to the request when its row is created
            pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _compile(compiler: Any, spec: GrammarSpec) -> Any:
    if spec.kind == "json_object":
        # Any object: the schema {"type": "object"} without strict mode, compact.
        return compiler.compile_json_schema(
            '{"type": "object"}', any_whitespace=False, separators=COMPACT, strict_mode=False
        )
    try:
        return compiler.compile_json_schema(
            spec.schema, any_whitespace=False, separators=COMPACT, strict_mode=True
        )
    except Exception as exc:  # xgrammar's errors are RuntimeError/ValueError subclasses
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InvalidRequestError(
            f"response_format.json_schema.schema cannot be enforced: {detail}",
            param="response_format.json_schema.schema",
            code="invalid_json_schema",
        ) from None


def canonical_schema(schema: Any) -> str:
    """The schema as compact text (the cache key). Keys keep their order: the output's
    properties come in the order the schema lists them."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def new_matcher(compiled: Any) -> Any:
    import xgrammar

    return xgrammar.GrammarMatcher(compiled)


def new_bitmask(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A host bitmask of ``rows`` rows (pinned when it is copied to a GPU)."""
    words = (vocab + 31) // 32
    mask = torch.full((rows, words), -1, dtype=torch.int32)
    return mask.pin_memory() if device.type == "cuda" else mask


def fill_bitmask(bitmask: torch.Tensor, matchers: Sequence[Any], offsets: Sequence[int]) -> None:
    """Row ``offsets[j]`` of ``bitmask``: the tokens matcher j allows (bit t%32 of int32
    word t//32)."""
    for matcher, offset in zip(matchers, offsets, strict=True):
        matcher.fill_next_token_bitmask(bitmask, offset)


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, offsets: list[int], index: torch.Tensor,
    *, owned: bool,
) -> torch.Tensor:
    """``logits`` [n, vocab] with rows ``offsets`` (``index`` on the device) limited to
    the same rows of the host ``bitmask``. ``owned``: ``logits`` may be changed in place
    (otherwise it may be a captured graph's output, and a copy is masked)."""
    count = logits.shape[0]
    if logits.device.type == "cpu":  # xgrammar's own CPU kernel, in place
        import xgrammar

        out = logits if owned else logits.clone()
        xgrammar.apply_token_bitmask_inplace(out, bitmask[:count], indices=offsets)
        return out
    rows = bitmask[:count].to(logits.device, non_blocking=True).index_select(0, index)
    return mask_with_bits(logits, rows, index)


def mask_with_bits(logits: torch.Tensor, bits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The device path: rows ``index`` of ``logits`` limited to ``bits`` [len(index),
    words] (a new tensor). Bit t%32 of int32 word t//32 is bit t%8 of byte t//8 in the
    little-endian bytes, so the bits unpack as bytes."""
    rows, vocab = index.shape[0], logits.shape[-1]
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    unpacked = (bits.view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    banned = unpacked.view(rows, -1)[:, :vocab] == 0
    if rows == logits.shape[0]:
        return logits.masked_fill(banned, float("-inf"))
    limited = logits.index_select(0, index).masked_fill(banned, float("-inf"))
    return logits.index_copy(0, index, limited)

"""Prompt embeddings with each audio's encoder output spliced into its span: the same for
every model family (each brings its own token embedding, span finder and encoder)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from oai_audio_server.audio.types import AudioSegmentFeatures
from oai_audio_server.models.base import AudioSpan

# The audios of a batch (and their spans) -> one output [tokens, hidden] per audio.
AudioEncoder = Callable[[list[AudioSegmentFeatures], list[AudioSpan]], Sequence[torch.Tensor]]


def embed_with_audio(
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    prompts: Sequence[Sequence[int]],
    audio: Sequence[Sequence[AudioSegmentFeatures]],
    starts: Sequence[int] | None,
    audio_spans: Callable[[Sequence[int], Sequence[AudioSegmentFeatures]], list[AudioSpan]],
    encode: AudioEncoder,
) -> list[torch.Tensor]:
    """Embeddings [len - start, hidden] of each prompt from its ``start``. Only the
    audios that reach past ``start`` are encoded (a cached prefix's are not), those of
    all prompts in one encoder batch."""
    starts = list(starts) if starts is not None else [0] * len(prompts)
    embeds = [
        embed_tokens(torch.tensor(list(prompt[start:]), dtype=torch.long, device=device))
        for prompt, start in zip(prompts, starts, strict=True)
    ]
    wanted = [
        (row, segment, span)
        for row, (prompt, row_audio) in enumerate(zip(prompts, audio, strict=True))
        if row_audio  # a prompt without audio is all text (its ids were never checked)
        for segment, span in zip(row_audio, audio_spans(prompt, row_audio), strict=True)
        if span.end > starts[row] and span.end > span.start
    ]
    if not wanted:
        return embeds
    encoded = encode([segment for _, segment, _ in wanted], [span for _, _, span in wanted])
    for (row, _, span), out in zip(wanted, encoded, strict=True):
        start = starts[row]
        first = max(span.start, start)
        embeds[row][first - start : span.end - start] = out[first - span.start :].to(
            embeds[row].dtype
        )
    return embeds

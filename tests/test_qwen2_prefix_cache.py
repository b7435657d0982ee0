"""Prefix caching with Qwen2-Audio: a repeated audio question and a second turn start
from the cache with the same answers; another audio behind the same ids never hits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_prefix_cache import cache_off, matchable, one_by_one
from test_qwen2_audio import prepared, samples

from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.engine.types import GenerationRequest, SamplingParams
from oai_audio_server.models.registry import PromptBuilder
from oai_audio_server.qwen.conversation import AudioItem, Conversation, HistoryTurn, TextItem
from oai_audio_server.settings import Settings

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle(qwen2_checkpoint: Path) -> ModelBundle:
    return load_bundle(Settings(model=str(qwen2_checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def builder(bundle: ModelBundle) -> PromptBuilder:
    return bundle.prompt_builder()


def ask(builder: PromptBuilder, name: str, conversation: Conversation) -> GenerationRequest:
    prompt = builder.build(conversation)
    return GenerationRequest(name, prompt.token_ids, prompt.audio_segments, GREEDY)


def test_qwen2_audio_hits_misses_and_answers_as_without_the_cache(
    bundle: ModelBundle, builder: PromptBuilder
) -> None:
    wave: np.ndarray = samples(3.0, 440.0)
    voice = prepared(bundle, wave, "a")
    other = prepared(bundle, samples(3.0, 220.0), "b")  # same length, other sound
    question = (AudioItem(voice), TextItem("What does the speaker say?"))
    first = ask(builder, "a", Conversation(query=question))
    again = ask(builder, "a2", Conversation(query=question))
    swapped = ask(builder, "b", Conversation(
        query=(AudioItem(other), TextItem("What does the speaker say?"))))
    assert swapped.prompt_ids == first.prompt_ids
    answer = cache_off(bundle, [first])[0]
    turn2 = ask(builder, "t2", Conversation(
        history=(HistoryTurn(question, answer.text),), query=(TextItem("Anything else?"),)))
    requests = [first, again, swapped, turn2]
    expected = cache_off(bundle, requests)
    outcomes, stats = one_by_one(bundle, requests)
    for got, want in zip(outcomes, expected, strict=True):
        assert got.finished.token_ids == want.finished.token_ids
    cached = [o.finished.cached_tokens for o in outcomes]
    audio_id = bundle.model.config.audio_token_id  # type: ignore[union-attr]
    before_audio = first.prompt_ids.index(audio_id)
    assert cached[0] == 0
    assert cached[1] == matchable(len(first.prompt_ids)) > before_audio + 50
    assert cached[2] <= before_audio  # another audio: only the text before it
    assert cached[3] >= matchable(len(first.prompt_ids))
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_qwen2_embedding_from_a_start_equals_the_tail(
    bundle: ModelBundle, builder: PromptBuilder
) -> None:
    model = bundle.model
    assert model is not None
    voice = prepared(bundle, samples(2.0, 330.0), "v")
    prompt = ask(builder, "e", Conversation(
        query=(AudioItem(voice), TextItem("Describe it")))).prompt_ids
    audio = list(voice.segments)
    (span,) = model.audio_spans(prompt, audio)
    whole = model.embed_prompts([prompt], [audio])[0]
    for start in ((span.start + span.end) // 2, span.end):
        tail = model.embed_prompts([prompt], [audio], [start])[0]
        assert torch.equal(tail, whole[start:])

"""Prefix caching in the engine (engine/prefix.py): a later request starts from the cached
blocks of an earlier one, and no answer changes: each greedy answer here equals the same
request's answer on an engine with prefix caching off."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from media import tone, wav_bytes
from test_engine_batching import (
    Outcome,
    assert_same,
    choices_of,
    collect,
    engine_for,
    request,
    run,
)

from oai_audio_server.audio.decode import decode_audio
from oai_audio_server.audio.types import PreparedAudio
from oai_audio_server.engine.cache_plan import CacheOptions
from oai_audio_server.engine.core import BatchingEngine
from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.engine.types import GenerationRequest
from oai_audio_server.qwen.conversation import AudioItem, Conversation, HistoryTurn, TextItem
from oai_audio_server.qwen.prompt import QwenPromptBuilder
from oai_audio_server.settings import Settings

OFF = CacheOptions(prefix_caching=False)
BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's ops are too small for intra-op threads (see the batching tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path) -> ModelBundle:
    return load_bundle(Settings(model=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def builder(bundle: ModelBundle) -> QwenPromptBuilder:
    return QwenPromptBuilder(bundle.tokenizer, max_window_size=bundle.max_window_size)


def clip(bundle: ModelBundle, seconds: float, freq: float, name: str) -> PreparedAudio:
    samples = decode_audio(wav_bytes(tone(seconds, freq)), format_hint="wav", max_seconds=30)
    return PreparedAudio(
        digest=name, duration_seconds=seconds, segments=(bundle.mel.extract(samples),)
    )


def one_by_one(
    bundle: ModelBundle, requests: list[GenerationRequest], cache: CacheOptions | None = None,
    **limits: object,
) -> tuple[list[Outcome], dict[str, float]]:
    """Each request after the one before it finished, on one engine."""

    async def sequence(engine: BatchingEngine) -> list[Outcome]:
        return [await collect(engine.submit(r)) for r in requests]

    with engine_for(bundle, cache=cache, **limits) as engine:
        outcomes = run(sequence(engine))
        return outcomes, engine.stats()


def cache_off(bundle: ModelBundle, requests: list[GenerationRequest]) -> list[Outcome]:
    return one_by_one(bundle, requests, OFF, max_batch_size=1)[0]


def matchable(prompt_len: int) -> int:
    """Positions a prompt can take from the cache: its full blocks before its last token."""
    return (prompt_len - 1) // BLOCK * BLOCK


def first_audio_position(req: GenerationRequest, start_id: int) -> int:
    return req.prompt_ids.index(start_id)


@pytest.fixture(scope="module")
def voice(bundle: ModelBundle) -> PreparedAudio:
    return clip(bundle, 4.0, 330.0, "a")


def test_the_same_prompt_again_starts_from_the_cache_with_the_same_answer(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio
) -> None:
    first = request(builder, "q", AudioItem(voice), TextItem("What do you hear?"),
                    max_tokens=40)
    again = request(builder, "q2", AudioItem(voice), TextItem("What do you hear?"),
                    max_tokens=40)
    expected = cache_off(bundle, [first])[0]
    (cold, warm), stats = one_by_one(bundle, [first, again])
    assert_same([cold, warm], [expected, expected])
    assert cold.finished.cached_tokens == 0
    length = len(first.prompt_ids)
    assert warm.finished.cached_tokens == matchable(length) > 100
    assert stats["prefix_cache_hit_tokens"] == matchable(length)
    assert stats["prefix_cache_miss_tokens"] == 2 * length - matchable(length)
    assert stats["kv_blocks_cached"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]  # cached blocks are free


def test_different_audio_behind_the_same_ids_never_hits(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio
) -> None:
    other = clip(bundle, 4.0, 440.0, "b")  # same length: the same prompt ids
    first = request(builder, "a", AudioItem(voice), TextItem("Describe it"), max_tokens=30)
    second = request(builder, "b", AudioItem(other), TextItem("Describe it"), max_tokens=30)
    assert first.prompt_ids == second.prompt_ids
    expected = cache_off(bundle, [first, second])
    assert expected[0].finished.token_ids != expected[1].finished.token_ids
    outcomes, _ = one_by_one(bundle, [first, second])
    assert_same(outcomes, expected)
    # Only the blocks before the audio (system prompt, chat tags) are shared.
    start_id = bundle.tokenizer.audio_start_id  # type: ignore[attr-defined]
    before_audio = first_audio_position(second, start_id)
    assert 0 < outcomes[1].finished.cached_tokens <= before_audio


def test_turn_two_reuses_turn_one_and_its_answer(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio
) -> None:
    """Turn 2 sends turn 1's prompt and answer again: it starts past turn 1's prompt, and
    past its answer where the answer's text gives back the same ids."""
    turn1 = request(builder, "t1", AudioItem(voice), TextItem("What is this?"), max_tokens=24)
    answer = cache_off(bundle, [turn1])[0]
    conversation = Conversation(
        history=(HistoryTurn(query=(AudioItem(voice), TextItem("What is this?")),
                             response=answer.text),),
        query=(TextItem("And then?"),),
    )
    prompt = builder.build(conversation)
    turn2 = GenerationRequest("t2", prompt.token_ids, prompt.audio_segments,
                              turn1.sampling)
    expected = cache_off(bundle, [turn2])[0]
    (first, second), _ = one_by_one(bundle, [turn1, turn2])
    assert_same([first, second], [answer, expected])
    assert second.finished.cached_tokens >= matchable(len(turn1.prompt_ids)) > 0


def test_evictions_under_a_small_cache_change_no_answer_and_return_every_block(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio
) -> None:
    """A cache of 24 blocks: prompts of about 10 blocks each evict each other's cached
    blocks, least recently used first; the first prompt, asked again after two others,
    finds its blocks gone, and every answer equals the answer with caching off."""
    other = clip(bundle, 4.0, 440.0, "b")
    third = clip(bundle, 4.0, 550.0, "c")
    requests = [
        request(builder, "a", AudioItem(voice), TextItem("Describe it"), max_tokens=20),
        request(builder, "a2", AudioItem(voice), TextItem("Describe it"), max_tokens=20),
        request(builder, "b", AudioItem(other), TextItem("Describe it"), max_tokens=20),
        request(builder, "c", AudioItem(third), TextItem("Describe it"), max_tokens=20),
        request(builder, "a3", AudioItem(voice), TextItem("Describe it"), max_tokens=20),
    ]
    length = len(requests[0].prompt_ids)
    assert 8 * BLOCK < length < 11 * BLOCK
    expected = cache_off(bundle, requests)
    small = CacheOptions(num_blocks=24)
    outcomes, stats = one_by_one(bundle, requests, small, max_batch_size=2)
    assert_same(outcomes, expected)
    cached = [o.finished.cached_tokens for o in outcomes]
    assert cached[1] == matchable(length)  # nothing evicted yet
    assert cached[4] < matchable(length)  # b and c evicted a's later blocks first
    # ... so it starts inside its audio: the rest of the span from the encoder's output.
    start_id = bundle.tokenizer.audio_start_id  # type: ignore[attr-defined]
    audio_start = first_audio_position(requests[0], start_id)
    assert audio_start < cached[4] < audio_start + voice.segments[0].token_count + 2
    assert stats["kv_blocks_cached"] <= stats["kv_blocks_total"] == 24
    assert stats["kv_blocks_free"] == 24 and stats["failed"] == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["lockstep", "overlapped"])
def test_preempted_rows_come_back_from_their_cached_blocks(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio, overlap: bool
) -> None:
    """Four rows in 20 blocks: decoding runs out, rows are preempted and resume from the
    blocks they left cached (overlapped: not counting a queued step's token); answers
    equal caching off, and every block comes back."""
    requests = [
        request(builder, f"r{i}", AudioItem(voice), TextItem(f"Question {i}"),
                max_tokens=60 + 10 * i)
        for i in range(4)
    ]
    expected = cache_off(bundle, requests)

    async def together(engine: BatchingEngine) -> list[Outcome]:
        handles = [engine.submit(r) for r in requests]
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    with engine_for(bundle, max_batch_size=4, cache=CacheOptions(num_blocks=20),
                    overlap_steps=overlap) as engine:
        outcomes = run(together(engine))
        stats = engine.stats()
    assert_same(outcomes, expected)
    assert stats["preemptions"] >= 1 and stats["failed"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 20


def test_batched_requests_sharing_a_prefix_answer_as_solo_without_the_cache(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio
) -> None:
    """One request fills the cache; then five questions about the same audio arrive
    together, share its blocks by reference and answer as each alone, caching off."""
    warm = request(builder, "warm", AudioItem(voice), TextItem("Describe it"), max_tokens=8)
    questions = [
        request(builder, f"q{i}", AudioItem(voice), TextItem(text), max_tokens=20 + 7 * i)
        for i, text in enumerate(["Describe it", "How long is it?", "Is it loud?",
                                  "What pitch?", "Describe it"])
    ]
    expected = cache_off(bundle, questions)

    async def scenario(engine: BatchingEngine) -> list[Outcome]:
        await collect(engine.submit(warm))
        handles = [engine.submit(r) for r in questions]
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    with engine_for(bundle, max_batch_size=8) as engine:
        outcomes = run(scenario(engine))
        stats = engine.stats()
    assert_same(outcomes, expected)
    assert stats["peak_batch_size"] >= 2
    start_id = bundle.tokenizer.audio_start_id  # type: ignore[attr-defined]
    past_audio = first_audio_position(warm, start_id) + len(voice.segments) * 2
    assert all(o.finished.cached_tokens > past_audio for o in outcomes)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_prompts_either_side_of_the_ntk_crossing_share_nothing(
    bundle: ModelBundle, builder: QwenPromptBuilder
) -> None:
    """Past 2048 tokens Qwen-Audio rotates every position with another NTK base: a
    longer prompt that starts with a shorter one's ids (or the other way round) must
    not take its blocks, while two long prompts share theirs."""
    words = " ".join(f"word{i % 97}" for i in range(360))
    short = request(builder, "short", TextItem(words), max_tokens=12)
    long = request(builder, "long", TextItem(words + " and more" * 100), max_tokens=12)
    long2 = request(builder, "long2", TextItem(words + " and more" * 120), max_tokens=12)
    assert len(short.prompt_ids) < 2048 < len(long.prompt_ids)
    model = bundle.model
    assert model is not None
    assert model.rotary_variant(len(short.prompt_ids)) != model.rotary_variant(
        len(long.prompt_ids)) == model.rotary_variant(len(long2.prompt_ids))
    requests = [short, long, long2, short]
    expected = cache_off(bundle, requests)
    outcomes, _ = one_by_one(bundle, requests)
    assert_same(outcomes, expected)
    cached = [o.finished.cached_tokens for o in outcomes]
    assert cached[1] == 0  # shares the short prompt's ids, not its rotation
    assert cached[2] > 2048  # the long one's blocks
    assert cached[3] == matchable(len(short.prompt_ids))  # its own, not the long ones'


def test_prefix_caching_off_takes_nothing_from_the_cache(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio
) -> None:
    same = request(builder, "q", AudioItem(voice), TextItem("Describe it"), max_tokens=8)
    outcomes, stats = one_by_one(bundle, [same, same], OFF)
    assert [o.finished.cached_tokens for o in outcomes] == [0, 0]
    assert stats["kv_blocks_cached"] == stats["prefix_cache_hit_tokens"] == 0


def test_the_choices_of_a_cached_prompt_share_its_blocks(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio
) -> None:
    """``n`` = 3 seeded choices of a prompt asked before: the first choice starts from
    the cached blocks, the others fork from it; each answers as the same request alone
    with caching off, each reports the cached prefix, and every block comes back."""
    first = request(builder, "n", AudioItem(voice), TextItem("What can you hear?"),
                    max_tokens=24, temperature=1.0, seed=11)
    choices = choices_of(first, 3)
    independent = [replace(c, same_prompt_as_previous=False) for c in choices]
    expected = cache_off(bundle, independent)

    async def scenario(engine: BatchingEngine) -> list[Outcome]:
        await collect(engine.submit(replace(first, request_id="warm")))
        handles = engine.submit_group(choices)
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    with engine_for(bundle, max_batch_size=4) as engine:
        outcomes = run(scenario(engine))
        stats = engine.stats()
    assert_same(outcomes, expected)
    assert len({tuple(o.finished.token_ids) for o in outcomes}) > 1  # seeds differ
    cached = matchable(len(first.prompt_ids))
    assert [o.finished.cached_tokens for o in outcomes] == [cached] * 3
    assert stats["prefix_cache_hit_tokens"] == cached  # the choices' one prefill
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_embedding_from_a_start_equals_the_tail_and_skips_cached_audio(
    bundle: ModelBundle, builder: QwenPromptBuilder, voice: PreparedAudio,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``embed_prompts(..., starts)``: from inside an audio span, the tail of the whole
    prompt's embeddings; from past the audio, the same without running the encoder."""
    model = bundle.model
    assert model is not None
    prompt = request(builder, "e", AudioItem(voice), TextItem("Describe it")).prompt_ids
    audio = list(voice.segments)
    (span,) = model.audio_spans(prompt, audio)
    whole = model.embed_prompts([prompt], [audio])[0]
    inside = (span.start + span.end) // 2
    assert torch.equal(model.embed_prompts([prompt], [audio], [inside])[0], whole[inside:])
    encoded: list[int] = []

    def counting(*args: object, **kwargs: object) -> list[torch.Tensor]:
        encoded.append(1)
        return []

    monkeypatch.setattr(model.transformer.audio, "forward", counting)  # type: ignore[attr-defined]
    past = model.embed_prompts([prompt], [audio], [span.end])[0]
    assert encoded == [] and torch.equal(past, whole[span.end :])

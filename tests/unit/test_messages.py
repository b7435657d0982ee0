"""OpenAI message lists to Qwen conversations, including the odd orders."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from oai_audio_server.audio.types import AudioSegmentFeatures, PreparedAudio
from oai_audio_server.chat.messages import AudioBudget, to_conversation
from oai_audio_server.errors import InvalidAudioError, InvalidRequestError
from oai_audio_server.protocol import ChatMessage, InputAudio, InputAudioPart, TextPart
from oai_audio_server.qwen.conversation import DEFAULT_SYSTEM, AudioItem, Conversation, TextItem


def fake_audio(seconds: float = 1.0) -> PreparedAudio:
    segment = AudioSegmentFeatures(torch.zeros(1), 50, 25, 0.0, seconds)
    return PreparedAudio(digest=str(np.random.rand()), duration_seconds=seconds,
                         segments=(segment,))


async def load_ok(part: object) -> PreparedAudio:
    return fake_audio()


async def load_bad(part: object) -> PreparedAudio:
    raise InvalidAudioError("not audio")


def convert(messages: list[ChatMessage], loader=load_ok, budget=None) -> Conversation:  # type: ignore[no-untyped-def]
    return asyncio.run(to_conversation(messages, loader, budget or AudioBudget(16, 600.0)))


def msg(role: str, content: object = None) -> ChatMessage:
    return ChatMessage(role=role, content=content)  # type: ignore[arg-type]


AUDIO = InputAudioPart(InputAudio(data="", format="wav"))


def test_plain_turns_become_history_and_query() -> None:
    conv = convert([msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2")])
    assert conv.system == DEFAULT_SYSTEM
    assert [(t.query, t.response) for t in conv.history] == [((TextItem("q1"),), "a1")]
    assert conv.query == (TextItem("q2"),)


def test_system_and_developer_messages_join_wherever_they_stand() -> None:
    conv = convert([msg("system", "A"), msg("user", "q"), msg("developer", "B")])
    assert conv.system == "A\nB"


def test_consecutive_messages_merge() -> None:
    conv = convert([msg("user", "a"), msg("user", [TextPart("b"), AUDIO]),
                    msg("assistant", "x"), msg("assistant", "y"), msg("user", "c")])
    query, response = conv.history[0].query, conv.history[0].response
    assert query[:3] == (TextItem("a"), TextItem("\n"), TextItem("b"))
    assert isinstance(query[3], AudioItem)
    assert response == "x\ny"


def test_leading_assistant_gets_an_empty_user_turn() -> None:
    conv = convert([msg("assistant", "Hi! How can I help?"), msg("user", "hello")])
    assert conv.history[0].query == () and conv.history[0].response == "Hi! How can I help?"


def test_trailing_assistant_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        convert([msg("user", "a"), msg("assistant", "b")])
    assert info.value.param == "messages[1]"


def test_assistant_with_only_tool_calls_counts_as_empty_text() -> None:
    conv = convert([msg("user", "a"), ChatMessage(role="assistant", tool_calls=[{}]),
                    msg("user", "b")])
    assert conv.history[0].response == ""


def test_audio_outside_user_messages_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        convert([msg("system", [AUDIO]), msg("user", "x")])
    assert info.value.param == "messages[0].content[0]"


def test_audio_errors_point_at_the_part() -> None:
    with pytest.raises(InvalidAudioError) as info:
        convert([msg("user", [TextPart("t"), AUDIO])], loader=load_bad)
    assert info.value.param == "messages[0].content[1]"


def test_audio_budget_counts_items_and_seconds() -> None:
    with pytest.raises(InvalidRequestError) as info:
        convert([msg("user", [AUDIO, AUDIO, AUDIO])], budget=AudioBudget(2, 600.0))
    assert info.value.code == "too_many_audio_items"
    assert info.value.param == "messages[0].content[2]"
    with pytest.raises(InvalidRequestError) as info:
        convert([msg("user", [AUDIO, AUDIO])], budget=AudioBudget(8, 1.5))
    assert info.value.code == "audio_too_long"

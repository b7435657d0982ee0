"""Request fields to SamplingParams: defaults from the checkpoint, limits as 400s."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from oai_audio_server.chat.options import MAX_CHOICES, choice_count
from oai_audio_server.chat.service import sampling_params
from oai_audio_server.engine.loader import SamplingDefaults
from oai_audio_server.errors import ContextLengthExceededError, InvalidRequestError
from oai_audio_server.protocol import ChatCompletionRequest
from oai_audio_server.settings import Settings

QWEN_CHAT_DEFAULTS = SamplingDefaults(
    do_sample=True, temperature=1.0, top_p=0.5, top_k=0, repetition_penalty=1.0,
    max_new_tokens=512,
)
BUNDLE: Any = SimpleNamespace(defaults=QWEN_CHAT_DEFAULTS, max_window_size=6144,
                              max_model_len=8192, vocab_limit=1000)
SETTINGS = Settings(model="m", max_tokens_limit=2048)


def req(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


def test_defaults_come_from_the_generation_config() -> None:
    params = sampling_params(req(), BUNDLE, SETTINGS, prompt_len=100)
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 0.5, 0)
    assert params.max_tokens == 512 and not params.greedy


def test_greedy_checkpoint_defaults_to_temperature_zero() -> None:
    greedy: Any = SimpleNamespace(
        defaults=SamplingDefaults(False, 0.7, 1.0, 0, 1.0, 64),
        max_window_size=6144, max_model_len=8192, vocab_limit=1000,
    )
    assert sampling_params(req(), greedy, SETTINGS, 10).greedy


def test_request_fields_win() -> None:
    params = sampling_params(
        req(temperature=0, top_p=0.9, top_k=5, seed=3, stop="END", repetition_penalty=1.2,
            max_completion_tokens=7, max_tokens=99),
        BUNDLE, SETTINGS, prompt_len=100,
    )
    assert params.greedy and params.top_p == 0.9 and params.top_k == 5 and params.seed == 3
    assert params.stop == ("END",) and params.repetition_penalty == 1.2
    assert params.max_tokens == 7  # max_completion_tokens wins over the legacy max_tokens


def test_default_max_tokens_shrinks_to_the_room_left() -> None:
    short: Any = SimpleNamespace(defaults=QWEN_CHAT_DEFAULTS, max_window_size=6144,
                                 max_model_len=6300, vocab_limit=1000)
    assert sampling_params(req(), short, SETTINGS, prompt_len=6000).max_tokens == 300


def test_limits() -> None:
    with pytest.raises(ContextLengthExceededError) as info:
        sampling_params(req(), BUNDLE, SETTINGS, prompt_len=7000)
    assert info.value.param == "messages"
    with pytest.raises(ContextLengthExceededError):
        sampling_params(req(max_tokens=3000), BUNDLE, SETTINGS.replace(max_tokens_limit=4096),
                        prompt_len=6144)
    with pytest.raises(InvalidRequestError) as error:
        sampling_params(req(max_tokens=5000), BUNDLE, SETTINGS, prompt_len=10)
    assert error.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as error:
        choice_count(req(n=MAX_CHOICES + 1))  # before any audio is decoded
    assert error.value.param == "n"
    assert choice_count(req(n=MAX_CHOICES)) == MAX_CHOICES


@pytest.mark.parametrize(("fields", "param"), [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"1000": 1}}, "logit_bias"),  # past the vocabulary
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
])
def test_generation_options_that_cannot_be_honoured(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        sampling_params(req(**fields), BUNDLE, SETTINGS, prompt_len=10)
    assert error.value.param == param


def test_generation_options_reach_the_engine() -> None:
    params = sampling_params(
        req(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"7": -100, "9": 2.5},
            logprobs=True, top_logprobs=4,
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "properties": {"b": {}, "a": {}}}}}),
        BUNDLE, SETTINGS, prompt_len=10,
    )
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == ((7, -100.0), (9, 2.5))
    assert params.logprobs and params.top_logprobs == 4
    assert params.grammar is not None and params.grammar.kind == "json_schema"
    assert params.grammar.schema.index('"b"') < params.grammar.schema.index('"a"')
    assert sampling_params(req(response_format={"type": "text"}), BUNDLE, SETTINGS,
                           prompt_len=10).grammar is None


def test_top_k_past_a_32_bit_int_is_a_400_naming_the_field() -> None:
    import msgspec
    import pytest as _pytest

    from oai_audio_server.protocol import chat_request_decoder

    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"top_k":9223372036854775808}'
    with _pytest.raises(msgspec.ValidationError, match="top_k"):
        chat_request_decoder.decode(body)

"""Qwen2-Audio's family detection, template choice and audio-token expansion, without
transformers (the parity with transformers is tests/test_qwen2_audio.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2_tiny import train_tokenizer  # noqa: E402

from oai_audio_server.audio.types import AudioSegmentFeatures, PreparedAudio  # noqa: E402
from oai_audio_server.models.checkpoint import UnsupportedCheckpointError  # noqa: E402
from oai_audio_server.models.qwen2_audio.chat_template import (  # noqa: E402
    DEFAULT_TEMPLATE,
    load_template,
)
from oai_audio_server.models.qwen2_audio.prompt import Qwen2PromptBuilder  # noqa: E402
from oai_audio_server.models.qwen2_audio.tokenizer import Qwen2AudioTokenizer  # noqa: E402
from oai_audio_server.models.registry import detect_family  # noqa: E402
from oai_audio_server.qwen.conversation import AudioItem, Conversation, TextItem  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer() -> Qwen2AudioTokenizer:
    return Qwen2AudioTokenizer(train_tokenizer())


def audio(tokens: int) -> PreparedAudio:
    segment = AudioSegmentFeatures(torch.zeros(1), 2 * tokens, tokens, 0.0, 1.0)
    return PreparedAudio("x", 1.0, (segment,))


def test_family_comes_from_config_json_not_the_name() -> None:
    assert detect_family({"architectures": ["Qwen2AudioForConditionalGeneration"]}).name == (
        "qwen2-audio"
    )
    assert detect_family({"architectures": ["QWenLMHeadModel"], "audio": {}}).name == (
        "qwen-audio"
    )
    with pytest.raises(UnsupportedCheckpointError, match="Qwen2ForCausalLM.*qwen2"):
        detect_family({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})


def test_checkpoint_template_wins_over_the_default(tmp_path: Path) -> None:
    assert load_template(tmp_path) == DEFAULT_TEMPLATE
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 1 }}"}))
    assert load_template(tmp_path) == "{{ 1 }}"


def test_audio_tokens_are_expanded_and_wrapped_once(tokenizer: Qwen2AudioTokenizer) -> None:
    tok = tokenizer
    default = Qwen2PromptBuilder(tok, DEFAULT_TEMPLATE)
    ids = default.build(Conversation(query=(AudioItem(audio(3)), TextItem("hi")))).token_ids
    start = ids.index(tok.audio_bos_id)
    assert ids[start : start + 5] == [tok.audio_bos_id, *[tok.audio_id] * 3, tok.audio_eos_id]
    # A template that writes a bare <|AUDIO|> gets the bos/eos added, as the processor does.
    bare = Qwen2PromptBuilder(
        tok, "{% for m in messages %}{% for c in m['content'] %}"
        "{% if c['type'] == 'audio' %}<|AUDIO|>{% endif %}{% endfor %}{% endfor %}",
    )
    ids = bare.build(Conversation(query=(AudioItem(audio(2)),), system="")).token_ids
    assert ids == [tok.audio_bos_id, tok.audio_id, tok.audio_id, tok.audio_eos_id]


def test_token_bytes_round_trip_text(tokenizer: Qwen2AudioTokenizer) -> None:
    text = "Héllo wörld, 12 $\n\t<|im_end|> ✓"
    table = tokenizer.token_bytes()
    ids = tokenizer.encode_text(text)
    assert b"".join(table[i] for i in ids).decode("utf-8") == text
    assert tokenizer.im_end_id not in ids
    assert table[tokenizer.im_end_id] == b"<|im_end|>"
    assert np.all([len(table[i]) > 0 for i in ids])

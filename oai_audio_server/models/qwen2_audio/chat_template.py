"""The checkpoint's chat template, rendered so that request text stays plain text.

Qwen2-Audio's processor template comes from the checkpoint's ``chat_template.json`` or
``chat_template.jinja``; the published checkpoint has neither (its tokenizer_config.json
template is the text-only Qwen2 one, which the processor does not use), so transformers'
processor falls back to its built-in template: :data:`DEFAULT_TEMPLATE` renders the same
text (a default system turn when none is given, each audio as ``Audio N:
<|audio_bos|><|AUDIO|><|audio_eos|>`` plus a newline, N counted over the conversation).

Every text of the conversation enters the template as a placeholder of random hex
digits. The rendered string is cut at the special-token strings the template wrote;
only then are the placeholders swapped for the request text, and the text between two
special tokens is encoded as plain text. For text without special-token strings this is
what the processor's tokenizer produces, token for token; text with them stays literal.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or message['type'] == 'audio' "
    "or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_template(model_dir: Path) -> str:
    """The processor's template of the checkpoint, else the built-in default."""
    as_json = Path(model_dir) / "chat_template.json"
    if as_json.is_file():
        data = json.loads(as_json.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
            return str(data["chat_template"])
    as_jinja = Path(model_dir) / "chat_template.jinja"
    if as_jinja.is_file():
        return as_jinja.read_text(encoding="utf-8")
    return DEFAULT_TEMPLATE


@dataclass(frozen=True)
class Special:
    """A special token the template wrote."""

    name: str


@dataclass(frozen=True)
class Text:
    """Plain text (template text with request text already in place)."""

    text: str


Piece = Special | Text


class TemplateRenderer:
    def __init__(self, template: str, special_names: Sequence[str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(template)
        names = sorted(special_names, key=len, reverse=True)
        self._specials = re.compile("|".join(re.escape(name) for name in names))

    def render(self, messages: list[dict[str, Any]]) -> list[Piece]:
        """``messages`` in the processor's form (string content, or a list of
        ``{"type": "text", "text": ...}`` / ``{"type": "audio"}`` parts), rendered with
        the generation prompt, as special tokens and plain text."""
        nonce = secrets.token_hex(16)
        texts: list[str] = []

        def hide(text: str) -> str:
            texts.append(text)
            return f"{nonce}{len(texts) - 1:08d}"

        hidden: list[dict[str, Any]] = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = hide(content)
            else:
                content = [
                    {"type": "text", "text": hide(part["text"])} if part["type"] == "text"
                    else dict(part)
                    for part in content
                ]
            hidden.append({**message, "content": content})
        rendered = self._template.render(messages=hidden, add_generation_prompt=True)
        marker = re.compile(re.escape(nonce) + r"(\d{8})")

        def reveal(chunk: str) -> str:
            return marker.sub(lambda m: texts[int(m.group(1))], chunk)

        pieces: list[Piece] = []
        cursor = 0
        for match in self._specials.finditer(rendered):
            if match.start() > cursor:
                pieces.append(Text(reveal(rendered[cursor : match.start()])))
            pieces.append(Special(match.group(0)))
            cursor = match.end()
        if cursor < len(rendered):
            pieces.append(Text(reveal(rendered[cursor:])))
        return pieces

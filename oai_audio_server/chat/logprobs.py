"""Engine log probabilities (token ids) in OpenAI's shape: ``token``, ``logprob``,
``bytes`` and ``top_logprobs`` per generated token.

``token`` is the token's text; a token that ends inside a UTF-8 character shows the
replacement character there, and ``bytes`` has the exact bytes (as OpenAI does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from oai_audio_server.engine.types import TokenLogprob
from oai_audio_server.protocol import ChoiceLogprobs, TokenLogprobEntry, TopLogprob


class LogprobFormatter:
    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._token_bytes = token_bytes

    def _text(self, token_id: int) -> tuple[str, list[int]]:
        raw = self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""
        return raw.decode("utf-8", "replace"), list(raw)

    def entries(self, logprobs: Iterable[TokenLogprob]) -> list[TokenLogprobEntry]:
        out = []
        for item in logprobs:
            text, raw = self._text(item.token_id)
            top = []
            for token_id, value in item.top:
                top_text, top_raw = self._text(token_id)
                top.append(TopLogprob(token=top_text, logprob=value, bytes=top_raw))
            out.append(TokenLogprobEntry(token=text, logprob=item.logprob, bytes=raw,
                                         top_logprobs=top))
        return out

    def choice(self, logprobs: Iterable[TokenLogprob]) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=self.entries(logprobs))

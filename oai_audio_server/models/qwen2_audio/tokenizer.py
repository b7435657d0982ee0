"""Qwen2-Audio's tokenizer, read from the checkpoint's ``tokenizer.json`` with the
``tokenizers`` library.

Request text is only ever encoded with :meth:`encode_text`: normaliser, pre-tokeniser
and BPE model run directly, without the added-token matching step, so ChatML markers or
audio tokens typed by a client stay literal text.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"


@cache
def byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte is one printable character (printable
    Latin-1 bytes themselves, the others 256 + their order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {char: b for b, char in chars.items()}


class Qwen2AudioTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self.special_tokens = {token.content: index for index, token in added.items()}
        for name in (ENDOFTEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS):
            if name not in self.special_tokens:
                raise ValueError(f"the tokenizer lacks Qwen2-Audio's special token {name}")
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.audio_id = self.special_tokens[AUDIO]
        self.audio_bos_id = self.special_tokens[AUDIO_BOS]
        self.audio_eos_id = self.special_tokens[AUDIO_EOS]

    @classmethod
    def from_dir(cls, model_dir: Path) -> Qwen2AudioTokenizer:
        path = Path(model_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no {TOKENIZER_FILE} (Qwen2-Audio's vocabulary)"
            )
        return cls(Tokenizer.from_file(str(path)))

    def __len__(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode_text(self, text: str) -> list[int]:
        """Plain text to ids, never an added (special) token."""
        if not text:
            return []
        tok = self._tokenizer
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        pieces = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer else [(text, None)]
        return [token.id for piece, _ in pieces for token in tok.model.tokenize(piece)]

    def token_bytes(self) -> list[bytes]:
        """Bytes of every id: BPE tokens their bytes, added tokens their text."""
        decoder = byte_decoder()
        added = {index: name for name, index in self.special_tokens.items()}
        table: list[bytes] = []
        for index in range(len(self)):
            if index in added:
                table.append(added[index].encode("utf-8"))
                continue
            token = self._tokenizer.id_to_token(index)
            if token is None:
                table.append(b"")
            else:
                table.append(bytes(decoder[char] for char in token if char in decoder))
        return table

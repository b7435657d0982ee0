"""Qwen-Audio's tokenizer, read from the checkpoint's ``qwen.tiktoken``.

The vocabulary is byte-level BPE (tiktoken) followed by special tokens in a fixed order:
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, 205 ``<|extra_N|>``, then the audio
task tokens (the audio pad, task, language and timestamp tags, ...) ending with
``<audio>`` and ``</audio>``. Their ids are positions in that order after the BPE ranks,
which is how the published checkpoint numbers them (``<audio>`` = 155163 there).

Request text is only ever encoded with :meth:`encode_text`, which never produces a
special token: tags and ChatML markers in what a client sends stay literal text.
"""

from __future__ import annotations

import base64
import unicodedata
from pathlib import Path

import tiktoken

VOCAB_FILE = "qwen.tiktoken"

# Pre-tokenisation regex of Qwen's tokenizer (a fact of the vocabulary, like the ranks).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO_START = "<audio>"
AUDIO_END = "</audio>"
AUDIO_PAD = "[[[AUDIO:modality]]]"

_LANGUAGES = ("en", "zh", "de", "es", "ko", "fr", "ja", "it")


def special_token_names() -> tuple[str, ...]:
    """Every special token in id order (ids start right after the BPE ranks)."""
    chat = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))
    audio = (
        AUDIO_PAD,
        "<|startoftranscript|>", "<|startofanalysis|>",
        "<|translate|>", "<|transcribe|>", "<|caption|>", "<|keyword|>",
        "<|unknown|>", *(f"<|{code}|>" for code in _LANGUAGES), "<|zh_tr|>",
        "<|notimestamps|>", "<|sil|>", "<|timestamps|>",
        *(f"<|{i * 0.01:.2f}|>" for i in range(3001)),
        "<|caption_audiocaps|>", "<|caption_clotho|>", "<|audioset_ontology|>",
        "<|caption_plain|>", "<|itn|>", "<|wo_itn|>",
        "<|startofentityvalue|>", "<|endofentityvalue|>", "<|startofentitytype|>",
        "<|endofentitytype|>", "<|named_entity_recognition|>", "<|audio_grounding|>",
        "<|startofword|>", "<|endofword|>", "<|delim|>", "<|emotion_recognition|>",
        "<|music_description|>", "<|note_analysis|>", "<|pitch|>",
        *(f"<|midi_pitch_{i}|>" for i in range(128)),
        "<|velocity|>", *(f"<|midi_velocity_{i}|>" for i in range(128)),
        "<|sonic|>", "<|instrument|>", "<|speaker_meta|>", "<|song_meta|>", "<|question|>",
        "<|answer|>", "<|choice|>", "<|scene|>", "<|event|>", "<|vocal_classification|>",
        "<|speech_understanding|>", "<|scenario|>", "<|action|>", "<|entities|>",
        "<|speech_edit|>",
        AUDIO_START, AUDIO_END,
    )  # fmt: skip
    return chat + audio


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class QwenAudioTokenizer:
    audio_start_tag = AUDIO_START
    audio_end_tag = AUDIO_END

    def __init__(self, ranks: dict[bytes, int]) -> None:
        self.special_tokens = {
            name: len(ranks) + i for i, name in enumerate(special_token_names())
        }
        self._encoding = tiktoken.Encoding(
            "qwen-audio", pat_str=PAT_STR, mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._ranks_count = len(ranks)
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.audio_start_id = self.special_tokens[AUDIO_START]
        self.audio_end_id = self.special_tokens[AUDIO_END]
        self.audio_pad_id = self.special_tokens[AUDIO_PAD]

    @classmethod
    def from_dir(cls, model_dir: Path) -> QwenAudioTokenizer:
        path = Path(model_dir) / VOCAB_FILE
        if not path.exists():  # not is_file(): reading any other kind of path says why it fails
            raise FileNotFoundError(f"{model_dir} has no {VOCAB_FILE} (Qwen-Audio's vocabulary)")
        return cls(load_bpe_ranks(path))

    def __len__(self) -> int:
        return self._ranks_count + len(self.special_tokens)

    def encode_text(self, text: str) -> list[int]:
        """Plain text to ids, never a special token. NFC first, as the official
        tokenizer normalises every text it encodes."""
        if not text:
            return []
        return self._encoding.encode_ordinary(unicodedata.normalize("NFC", text))

    def token_bytes(self) -> list[bytes]:
        """Bytes of every id: ordinary tokens their bytes, special tokens their text."""
        table = [self._encoding.decode_single_token_bytes(i) for i in range(self._ranks_count)]
        names = sorted(self.special_tokens.items(), key=lambda item: item[1])
        return table + [name.encode("utf-8") for name, _ in names]

    def from_list_format(self, items: list[dict[str, str]]) -> str:
        """The official list format: each audio as ``Audio N:<audio>ref</audio>\\n``
        (numbered within the call), text items as they are."""
        text = ""
        audios = 0
        for item in items:
            if "audio" in item:
                audios += 1
                text += f"Audio {audios}:{AUDIO_START}{item['audio']}{AUDIO_END}\n"
            elif "text" in item:
                text += item["text"]
            else:
                raise ValueError(f"unsupported list-format item: {sorted(item)}")
        return text

"""Tokenizer of the tiny Qwen-Audio test checkpoint.

Written for the project's tests. It reproduces the public interface and the
observable behaviour of the published Qwen-Audio-Chat tokenizer (tiktoken BPE, the
same special-token layout after the ordinary tokens, audio placeholders expanded
from `audio_info`, `process_audio` producing log-mels) on a tiny vocabulary.
"""

import base64
import os
import re
import unicodedata
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Set, Tuple, Union

import tiktoken
import torch
from transformers import AddedToken, PreTrainedTokenizer

from .tiny_audio import (
    HOP_LENGTH,
    MAX_SAMPLES,
    audio_token_count,
    find_mel_filters,
    frames_after_cnn,
    load_audio_file,
    load_mel_filters,
    log_mel,
    pad_or_trim,
)

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}

# Pre-tokenisation regex of the published tokenizer; the tokens a text splits into
# (and therefore prompt lengths) depend on it.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS

AUDIO_LANGUAGES = ("en", "zh", "de", "es", "ko", "fr", "ja", "it")


def _audio_special_tokens(start_tag: str, end_tag: str) -> Tuple[str, ...]:
    """Audio-related special tokens, in the published order (ids depend on it)."""
    return (
        "[[[AUDIO:modality]]]",
        "<|startoftranscript|>",
        "<|startofanalysis|>",
        "<|translate|>",
        "<|transcribe|>",
        "<|caption|>",
        "<|keyword|>",
        "<|unknown|>",
        *(f"<|{lang}|>" for lang in AUDIO_LANGUAGES),
        "<|zh_tr|>",
        "<|notimestamps|>",
        "<|sil|>",
        "<|timestamps|>",
        *(f"<|{i * 0.01:.2f}|>" for i in range(3001)),
        "<|caption_audiocaps|>",
        "<|caption_clotho|>",
        "<|audioset_ontology|>",
        "<|caption_plain|>",
        "<|itn|>",
        "<|wo_itn|>",
        "<|startofentityvalue|>",
        "<|endofentityvalue|>",
        "<|startofentitytype|>",
        "<|endofentitytype|>",
        "<|named_entity_recognition|>",
        "<|audio_grounding|>",
        "<|startofword|>",
        "<|endofword|>",
        "<|delim|>",
        "<|emotion_recognition|>",
        "<|music_description|>",
        "<|note_analysis|>",
        "<|pitch|>",
        *(f"<|midi_pitch_{i}|>" for i in range(128)),
        "<|velocity|>",
        *(f"<|midi_velocity_{i}|>" for i in range(128)),
        "<|sonic|>",
        "<|instrument|>",
        "<|speaker_meta|>",
        "<|song_meta|>",
        "<|question|>",
        "<|answer|>",
        "<|choice|>",
        "<|scene|>",
        "<|event|>",
        "<|vocal_classification|>",
        "<|speech_understanding|>",
        "<|scenario|>",
        "<|action|>",
        "<|entities|>",
        "<|speech_edit|>",
        start_tag,
        end_tag,
    )


def read_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            if not line.strip():
                continue
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    return ranks


def replace_tagged_spans(
    items: Sequence[Any],
    start: Any,
    end: Any,
    replace_span: Callable[[List[Any], int], List[Any]],
) -> List[Any]:
    """Rewrite every start..end span (inclusive) with replace_span(span, k).

    k numbers the spans from 0 in order of appearance; it indexes the per-audio
    lists of `audio_info`. Everything outside spans is kept as is.
    """
    out: List[Any] = []
    i, k, n = 0, 0, len(items)
    while i < n:
        if items[i] != start:
            out.append(items[i])
            i += 1
            continue
        j = i + 1
        while j < n and items[j] != end:
            j += 1
        if j == n:
            raise ValueError("Unclosed audio tag")
        out.extend(replace_span(list(items[i : j + 1]), k))
        k += 1
        i = j + 1
    return out


class TinyQwenAudioTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        errors="replace",
        audio_start_tag="<audio>",
        audio_end_tag="</audio>",
        **kwargs,
    ):
        # The encoding must exist before the base constructor runs: it may already
        # ask for the vocabulary size or add tokens.
        self.vocab_file = vocab_file
        self.errors = errors
        self.audio_start_tag = audio_start_tag
        self.audio_end_tag = audio_end_tag
        self.audio_pad_tag = "[[[AUDIO:modality]]]"
        self.AUDIO_ST = _audio_special_tokens(audio_start_tag, audio_end_tag)

        self.mergeable_ranks = read_tiktoken_ranks(vocab_file)
        first_special = len(self.mergeable_ranks)
        self.special_tokens = {tok: first_special + i for i, tok in enumerate(SPECIAL_TOKENS + self.AUDIO_ST)}
        self._build_encoding()

        self.audio_start_id = self.special_tokens[audio_start_tag]
        self.audio_end_id = self.special_tokens[audio_end_tag]
        self.audio_pad_id = self.special_tokens[self.audio_pad_tag]
        self.eod_id = self.tokenizer.eot_token
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]

        super().__init__(**kwargs)

    def _build_encoding(self):
        self.tokenizer = tiktoken.Encoding(
            "tiny_qwen_audio",
            pat_str=PAT_STR,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.decoder: Dict[int, Union[bytes, str]] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})

    # tiktoken encodings cannot be pickled; rebuild after copy/pickle.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("tokenizer", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_encoding()

    # ----- vocabulary -------------------------------------------------------

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    def get_vocab(self) -> Dict[Union[bytes, str], int]:
        vocab: Dict[Union[bytes, str], int] = dict(self.mergeable_ranks)
        vocab.update(self.special_tokens)
        return vocab

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, (str, bytes)):
            return self.special_tokens.get(tokens, self.mergeable_ranks.get(tokens))
        return [self.special_tokens.get(t, self.mergeable_ranks.get(t)) for t in tokens]

    def _convert_token_to_id(self, token: Union[bytes, str]) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in self.mergeable_ranks:
            return self.mergeable_ranks[token]
        raise ValueError(f"unknown token {token!r}")

    def _convert_id_to_token(self, index: int) -> Union[bytes, str]:
        if index in self.decoder:
            return self.decoder[index]
        raise ValueError(f"unknown id {index}")

    def _add_tokens(self, new_tokens: Union[List[str], List[AddedToken]], special_tokens: bool = False) -> int:
        # The vocabulary is fixed; only already-known special tokens may be "added".
        if not special_tokens and new_tokens:
            raise ValueError("Adding regular tokens is not supported")
        for tok in new_tokens:
            surface = tok.content if isinstance(tok, AddedToken) else tok
            if surface not in self.special_tokens:
                raise ValueError("Adding unknown special tokens is not supported")
        return 0

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None, **kwargs):
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf8") as f:
            for tok, rank in self.mergeable_ranks.items():
                f.write(f"{base64.b64encode(tok).decode('ascii')} {rank}\n")
        return (path,)

    # ----- encoding ---------------------------------------------------------

    def tokenize(
        self,
        text: str,
        allowed_special: Union[Set[str], str] = "all",
        disallowed_special: Union[Collection[str], str] = (),
        audio_info: Optional[Dict] = None,
        **kwargs,
    ) -> List[Union[bytes, str]]:
        """Surface forms (bytes, or str for specials) of `text`.

        With `audio_info`, the k-th `<audio>...</audio>` span (the file name in
        between) becomes `<audio>`, audio_span_tokens[k] - 2 placeholders, `</audio>`.
        """
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        tokens = [self.decoder[i] for i in ids]

        def expand(span, k):
            if audio_info is None:
                return span
            n_pad = audio_info["audio_span_tokens"][k] - 2
            return [self.audio_start_tag] + [self.audio_pad_tag] * n_pad + [self.audio_end_tag]

        return replace_tagged_spans(tokens, self.audio_start_tag, self.audio_end_tag, expand)

    def _tokenize(self, text, **kwargs):
        # Everything goes through tokenize(); the base class must never get here.
        raise NotImplementedError

    def convert_tokens_to_string(self, tokens: List[Union[bytes, str]]) -> str:
        parts: List[str] = []
        pending = b""
        for tok in tokens:
            if isinstance(tok, bytes):
                pending += tok
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors=self.errors))
                pending = b""
            parts.append(tok)
        if pending:
            parts.append(pending.decode("utf-8", errors=self.errors))
        return "".join(parts)

    # ----- decoding ---------------------------------------------------------

    def _decode(
        self,
        token_ids: Union[int, List[int]],
        skip_special_tokens: bool = False,
        errors: Optional[str] = None,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        audio_info = kwargs.pop("audio_info", None)

        def restore_url(span, k):
            # Placeholders carry no text; put the file name back so that a decoded
            # prompt equals the text it was built from.
            if audio_info is None:
                return span
            url = audio_info["audio_urls"][k]
            return [self.audio_start_id] + self.tokenizer.encode(url) + [self.audio_end_id]

        token_ids = replace_tagged_spans(list(token_ids), self.audio_start_id, self.audio_end_id, restore_url)
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < self.eod_id]
        return self.tokenizer.decode(token_ids, errors=errors or self.errors)

    # ----- audio ------------------------------------------------------------

    def from_list_format(self, list_format: List[Dict]) -> str:
        text = ""
        n_audio = 0
        for item in list_format:
            if "audio" in item:
                n_audio += 1
                text += f"Audio {n_audio}:{self.audio_start_tag}{item['audio']}{self.audio_end_tag}\n"
            elif "text" in item:
                text += item["text"]
            else:
                raise ValueError("Unsupport element: " + str(item))
        return text

    def extract_audio_urls(self, text: str) -> List[str]:
        return re.findall(f"{self.audio_start_tag}(.*?){self.audio_end_tag}", text)

    def _mel_filters(self) -> torch.Tensor:
        # The model's from_pretrained copies the file next to this module (as the
        # published code does); the checkpoint directory itself also has it, which
        # makes the tokenizer usable before any model is loaded.
        path = find_mel_filters(
            self.name_or_path if os.path.isdir(self.name_or_path or "") else None,
            os.path.dirname(os.path.abspath(__file__)),
        )
        return load_mel_filters(path)

    def process_audio(self, text: str) -> Optional[Dict[str, Any]]:
        urls = self.extract_audio_urls(text)
        if not urls:
            return None
        filters = self._mel_filters()
        mels, lengths, spans = [], [], []
        for url in urls:
            if url.startswith(("http://", "https://")):
                raise ValueError("the tiny test tokenizer only loads local files")
            wave = load_audio_file(url)
            n_samples = min(wave.shape[0], MAX_SAMPLES)
            mel_len = n_samples // HOP_LENGTH
            after_cnn = frames_after_cnn(mel_len)
            n_tokens = audio_token_count(after_cnn)
            mels.append(log_mel(pad_or_trim(wave), filters))
            lengths.append([after_cnn, n_tokens])
            spans.append(n_tokens + 2)  # + the <audio> and </audio> ends
        return {
            "input_audios": torch.stack(mels, dim=0),
            "input_audio_lengths": torch.IntTensor(lengths),
            "audio_span_tokens": spans,
            "audio_urls": urls,
        }

"""The instructions Qwen-Audio-Chat gets for each task, as plain Conversations.

Qwen-Audio-Chat is a chat model: it is asked in natural language, one audio segment per
prompt, in the form its own demo uses (``Audio 1:<audio>…</audio>\\nwhat does the person
say?``). The prompt is built by ``QwenPromptBuilder`` like every chat prompt, so the
``language`` and ``prompt`` fields of a request are plain text: they can never add audio
tags or chat turns.
"""

from __future__ import annotations

from typing import Literal

from oai_audio_server.audio.types import AudioSegmentFeatures, PreparedAudio
from oai_audio_server.qwen.conversation import DEFAULT_SYSTEM, AudioItem, Conversation, TextItem

Task = Literal["transcribe", "translate"]

TRANSCRIBE_INSTRUCTION = (
    "what does the person say? Reply with an exact transcript of the speech, word for "
    "word, and nothing else: no introduction, no quotation marks, no comments."
)
TRANSLATE_INSTRUCTION = (
    "Translate what the person says into English. Reply with the English translation "
    "only, and nothing else: no introduction, no quotation marks, no comments."
)
# Whisper keeps only the last 224 tokens of its prompt; a few hundred characters of
# previous context are plenty to steer spelling and style.
MAX_CONTEXT_CHARS = 1000

# ISO-639-1 codes Whisper accepts, with the names Whisper reports in verbose_json.
LANGUAGE_NAMES: dict[str, str] = {
    "af": "afrikaans", "ar": "arabic", "hy": "armenian", "az": "azerbaijani",
    "be": "belarusian", "bs": "bosnian", "bg": "bulgarian", "ca": "catalan",
    "zh": "chinese", "hr": "croatian", "cs": "czech", "da": "danish", "nl": "dutch",
    "en": "english", "et": "estonian", "fi": "finnish", "fr": "french",
    "gl": "galician", "de": "german", "el": "greek", "he": "hebrew", "hi": "hindi",
    "hu": "hungarian", "is": "icelandic", "id": "indonesian", "it": "italian",
    "ja": "japanese", "kn": "kannada", "kk": "kazakh", "ko": "korean", "lv": "latvian",
    "lt": "lithuanian", "mk": "macedonian", "ms": "malay", "mr": "marathi",
    "mi": "maori", "ne": "nepali", "no": "norwegian", "fa": "persian", "pl": "polish",
    "pt": "portuguese", "ro": "romanian", "ru": "russian", "sr": "serbian",
    "sk": "slovak", "sl": "slovenian", "es": "spanish", "sw": "swahili",
    "sv": "swedish", "tl": "tagalog", "ta": "tamil", "th": "thai", "tr": "turkish",
    "uk": "ukrainian", "ur": "urdu", "vi": "vietnamese", "cy": "welsh",
    "yue": "cantonese",
}  # fmt: skip


def language_name(code: str) -> str:
    """Whisper's name for a language code; the code itself when we do not know it."""
    return LANGUAGE_NAMES.get(code, code)


def instruction(task: Task, *, language: str | None, context: str | None) -> str:
    """The text after the audio: the task, then the optional hints."""
    parts = [TRANSCRIBE_INSTRUCTION if task == "transcribe" else TRANSLATE_INSTRUCTION]
    if task == "transcribe" and language:
        name = language_name(language).capitalize()
        parts.append(f"The person speaks {name}; write the transcript in {name}.")
    if context and context.strip():
        tail = " ".join(context.split())[-MAX_CONTEXT_CHARS:]
        parts.append(
            "For spelling and style, this is the text that came before this audio "
            f"(do not repeat it): {tail}"
        )
    return " ".join(parts)


def segment_audio(audio: PreparedAudio, index: int) -> PreparedAudio:
    """One segment of a long audio as an audio item of its own."""
    segment: AudioSegmentFeatures = audio.segments[index]
    return PreparedAudio(
        digest=f"{audio.digest}#{index}",
        duration_seconds=segment.end_seconds - segment.start_seconds,
        segments=(segment,),
    )


def task_conversation(
    task: Task, audio: PreparedAudio, *, language: str | None, context: str | None
) -> Conversation:
    """A one-turn, one-audio conversation: the audio first, then the instruction."""
    text = instruction(task, language=language, context=context)
    return Conversation(query=(AudioItem(audio), TextItem(text)), system=DEFAULT_SYSTEM)

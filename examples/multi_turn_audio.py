"""A conversation that keeps earlier audio in its history: the second question refers
back to the first clip. The server caches decoded audio, so resending it is cheap.

    OAS_BASE_URL=http://127.0.0.1:8000/v1 python examples/multi_turn_audio.py [a.wav [b.wav]]

Without files the first clip is examples/speech.mp3 (a spoken sentence shipped with the
project) and the second a generated tone.
"""

from __future__ import annotations

import base64
from typing import Any

from _audio import API_KEY, BASE_URL, MODEL, audio_from_argv, tone_wav
from openai import OpenAI


def audio_part(data: bytes, fmt: str) -> dict[str, Any]:
    return {"type": "input_audio",
            "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def main() -> None:
    first, first_fmt = audio_from_argv(1)
    second, second_fmt = audio_from_argv(2)
    if second == first:
        second, second_fmt = tone_wav(1.0, 880.0), "wav"
    client = OpenAI(base_url=BASE_URL, api_key=API_KEY)
    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [audio_part(first, first_fmt),
                                     {"type": "text", "text": "What is in this audio?"}]},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48)
    answer = reply.choices[0].message.content or ""
    print("turn 1:", answer)
    messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": [audio_part(second, second_fmt),
                                     {"type": "text", "text": "How does this one differ?"}]},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48)
    print("turn 2:", reply.choices[0].message.content)


if __name__ == "__main__":
    main()

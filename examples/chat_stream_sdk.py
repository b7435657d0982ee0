"""Stream the answer token by token with the official openai SDK.

    OAS_BASE_URL=http://127.0.0.1:8000/v1 python examples/chat_stream_sdk.py [audio.wav]

Without a file it sends examples/speech.mp3, a spoken sentence shipped with the project.
"""

from __future__ import annotations

import base64

from _audio import API_KEY, BASE_URL, MODEL, audio_from_argv
from openai import OpenAI


def main() -> None:
    audio, fmt = audio_from_argv()
    client = OpenAI(base_url=BASE_URL, api_key=API_KEY)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(audio).decode(), "format": fmt},
                    },
                    {"type": "text", "text": "Describe this audio."},
                ],
            }
        ],
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            print(f"\n[completion tokens {chunk.usage.completion_tokens}]")


if __name__ == "__main__":
    main()

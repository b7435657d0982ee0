"""Ask about an audio file with the official openai SDK (one JSON reply).

    OAS_BASE_URL=http://127.0.0.1:8000/v1 python examples/chat_sdk.py [audio.wav]

Without a file it sends examples/speech.mp3, a spoken sentence shipped with the project.
"""

from __future__ import annotations

import base64

from _audio import API_KEY, BASE_URL, MODEL, audio_from_argv
from openai import OpenAI


def main() -> None:
    audio, fmt = audio_from_argv()
    client = OpenAI(base_url=BASE_URL, api_key=API_KEY)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(audio).decode(), "format": fmt},
                    },
                    {"type": "text", "text": "What does the person say?"},
                ],
            }
        ],
        max_tokens=64,
    )
    print(reply.choices[0].message.content)
    if reply.usage is not None:
        print(f"[prompt tokens {reply.usage.prompt_tokens}, "
              f"completion tokens {reply.usage.completion_tokens}]")


if __name__ == "__main__":
    main()

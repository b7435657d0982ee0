"""Pull fields out of an audio file as JSON with the openai SDK's parse(): the reply is
constrained by the schema of a pydantic model (structured outputs).

    OAS_BASE_URL=http://127.0.0.1:8000/v1 python examples/structured_output.py [audio.wav]

Without a file it sends examples/speech.mp3, a spoken sentence shipped with the project.
The server decodes under a grammar made from the schema, so the reply always parses; a
reply cut by max_tokens is only a prefix (finish_reason "length"), and parse() raises.
"""

from __future__ import annotations

import base64
from typing import Literal

from _audio import API_KEY, BASE_URL, MODEL, audio_from_argv
from openai import OpenAI
from pydantic import BaseModel


class Clip(BaseModel):
    speech: bool
    language: Literal["english", "chinese", "other"]
    mood: Literal["calm", "excited", "sad", "unclear"]


def main() -> None:
    audio, fmt = audio_from_argv()
    client = OpenAI(base_url=BASE_URL, api_key=API_KEY)
    reply = client.chat.completions.parse(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(audio).decode(), "format": fmt},
                    },
                    {"type": "text", "text": "Is there speech, in which language, and how "
                                             "does the speaker sound?"},
                ],
            }
        ],
        response_format=Clip,
        max_tokens=64,
        temperature=0,
    )
    clip = reply.choices[0].message.parsed
    assert clip is not None
    print(clip.model_dump_json())


if __name__ == "__main__":
    main()

"""Client of the tutorial route ``POST /audio/`` (multipart upload), using httpx.

    OAS_BASE_URL=http://127.0.0.1:8000/v1 python examples/tutorial_requests.py [audio] [question]

The tutorial routes live at the server root, so ``/v1`` is stripped from OAS_BASE_URL.
"""

from __future__ import annotations

import sys

import httpx
from _audio import API_KEY, BASE_URL, audio_from_argv


def main() -> None:
    audio, fmt = audio_from_argv()
    question = sys.argv[2] if len(sys.argv) > 2 else "what does the person say?"
    root = BASE_URL.rstrip("/").removesuffix("/v1")
    reply = httpx.post(
        f"{root}/audio/",
        files={"file": (f"audio.{fmt}", audio, "application/octet-stream")},
        data={"text": question},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=300,
    )
    reply.raise_for_status()
    body = reply.json()
    print(f"{body['response']}\n[{body['status']} in {body['time']:.2f} s]")


if __name__ == "__main__":
    main()

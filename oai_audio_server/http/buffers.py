"""One buffer from the chunks a request body arrived in, without holding the GIL long."""

from __future__ import annotations

from oai_audio_server.memory import AnonymousBuffer

# Below this, joining, scanning or decoding a body takes a few ms at most: done at once.
INLINE_BYTES = 256 * 1024


def assemble(chunks: list[bytes]) -> bytes | memoryview:
    """One buffer from received chunks. A large one is copied a chunk at a time into
    fresh anonymous memory: one join would hold the GIL for the whole copy."""
    total = sum(len(chunk) for chunk in chunks)
    if total <= INLINE_BYTES:
        return b"".join(chunks)
    buffer = AnonymousBuffer(total)
    for chunk in chunks:
        buffer.write(chunk)
    return buffer.view()

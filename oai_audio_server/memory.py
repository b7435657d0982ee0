"""Large buffers built a step at a time.

A single C call over tens of MiB (a join, a copy, a ``bytes()`` of a view) holds the GIL,
and with it the event loop, for the whole copy. These buffers live in anonymous memory,
whose pages are touched only as they are written, and grow by one small write at a time;
readers get a ``memoryview``, never a copy.
"""

from __future__ import annotations

import mmap


class AnonymousBuffer:
    def __init__(self, capacity: int) -> None:
        self._buffer = mmap.mmap(-1, max(1, capacity))
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._buffer[self.size : self.size + len(data)] = data
        self.size += len(data)

    def view(self) -> memoryview:
        return memoryview(self._buffer)[: self.size]

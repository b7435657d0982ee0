"""The engine as the services and the HTTP layer see it (apart from types.py, whose
request and event types the model-side code uses too, so that it imports no loader)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from oai_audio_server.engine.loader import ModelBundle
from oai_audio_server.engine.types import GenerationHandle, GenerationRequest


class Engine(Protocol):
    """What the services and the HTTP layer use of an engine: BatchingEngine (a worker
    thread in this process) and EngineProcess (the same in a child process)."""

    def start(self) -> None: ...

    def close(self, timeout: float = 10.0) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def load_error(self) -> BaseException | None: ...

    @property
    def bundle(self) -> ModelBundle: ...

    def submit(self, request: GenerationRequest) -> GenerationHandle: ...

    def submit_group(self, requests: list[GenerationRequest]) -> Sequence[GenerationHandle]: ...

    def stats(self) -> dict[str, float]: ...

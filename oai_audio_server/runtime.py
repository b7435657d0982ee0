"""What the HTTP layer needs at run time: the engine and the audio intake, with their
life cycle. Built by ``create_runtime`` and handed to ``create_app``; no globals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from oai_audio_server.audio.intake import AudioIntake
from oai_audio_server.engine.cache_plan import CacheOptions
from oai_audio_server.engine.core import BatchingEngine
from oai_audio_server.engine.interface import Engine
from oai_audio_server.engine.load_report import ModelLoadError, explained_loader
from oai_audio_server.engine.loader import ModelBundle
from oai_audio_server.engine.process import EngineProcess
from oai_audio_server.engine.types import GenerationHandle, GenerationRequest
from oai_audio_server.errors import (
    APIError,
    ModelLoadFailedError,
    NotReadyError,
    ShuttingDownError,
)
from oai_audio_server.lifecycle import Lifecycle, shutdown_error
from oai_audio_server.models.registry import PromptBuilder
from oai_audio_server.settings import Settings

T = TypeVar("T")

# How long close() lets the engine stop by itself before it is killed: it holds nothing
# that needs a clean stop, and an orchestrator's grace period is short (often 10 s).
ENGINE_STOP_SECONDS = 0.5
# Threads for work whose cost grows with the request body (JSON decoding, prompt
# tokenising, multipart parsing): off the event loop, and at most this many at once.
BODY_WORKERS = 2


def one_line(error: BaseException | str) -> str:
    """The first line of an error, for a reply or a log line (tracebacks go to the log)."""
    if isinstance(error, str | ModelLoadError):
        text = str(error)  # already says what failed
    else:
        text = f"{type(error).__name__}: {error}"
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return first if len(first) <= 300 else first[:297] + "..."


class Runtime:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.lifecycle = Lifecycle()
        if isinstance(engine, EngineProcess):
            engine.on_crash = self.lifecycle.engine_died
        # Decoding is CPU work kept off the event loop; a small pool bounds its threads.
        self._audio_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="oas-audio"
        )
        self._body_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=BODY_WORKERS, thread_name_prefix="oas-body"
        )
        self._intake: AudioIntake | None = None
        self._prompt_builder: PromptBuilder | None = None

    @property
    def bundle(self) -> ModelBundle:
        """The loaded bundle, or the 503 that says why there is none: shutting down or
        crashed (retry elsewhere), failed to load (no retry helps), or still loading."""
        if self.lifecycle.fatal is not None or self.lifecycle.cut_done:
            raise ShuttingDownError(
                f"the server is restarting: {self.lifecycle.fatal}; retry shortly"
                if self.lifecycle.fatal
                else shutdown_error().message
            )
        error = self.engine.load_error
        if error is not None and not self.engine.ready:
            raise ModelLoadFailedError(
                f"the model failed to load ({one_line(error)}); the server's log has the "
                "details, and the operator must fix the model setting and restart it"
            )
        return self.engine.bundle

    def unready(self) -> APIError | None:
        """Why the server cannot take a request now (the 503 to give), or None."""
        lifecycle = self.lifecycle
        if lifecycle.draining and lifecycle.fatal is None:
            return ShuttingDownError("the server is shutting down; retry shortly")
        if self.engine.ready and lifecycle.fatal is None and not lifecycle.cut_done:
            return None
        try:
            _ = self.bundle
        except APIError as error:
            return error
        return NotReadyError("the model is loading; retry shortly")

    @property
    def intake(self) -> AudioIntake:
        if self._intake is None:
            self._intake = AudioIntake(self.settings, self.bundle.mel, self._audio_pool)
        return self._intake

    @property
    def prompt_builder(self) -> PromptBuilder:
        if self._prompt_builder is None:
            self._prompt_builder = self.bundle.prompt_builder()
        return self._prompt_builder

    async def offload(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work`` on the body pool: off the event loop, bounded in concurrency."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._body_pool, work, *args)

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        return self.submit_group([request])[0]

    def submit_group(self, requests: list[GenerationRequest]) -> Sequence[GenerationHandle]:
        """Queue generations with the engine; the lifecycle tracks them so that the
        shutdown deadline can end them with an error instead of cutting their replies."""
        if self.lifecycle.cut_done or self.lifecycle.fatal is not None:
            _ = self.bundle  # raises the matching 503
        handles = self.engine.submit_group(requests)
        self.lifecycle.track(handles)
        return handles

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.close(timeout=ENGINE_STOP_SECONDS)
        self._audio_pool.shutdown(wait=False, cancel_futures=True)
        self._body_pool.shutdown(wait=False, cancel_futures=True)


def create_runtime(settings: Settings, load: Callable[[], ModelBundle] | None = None) -> Runtime:
    """The engine runs in its own process unless --no-engine-process, or unless a test
    hands in its own loader (a callable cannot cross into another process)."""
    engine: Engine
    if load is None and settings.engine_process:
        engine = EngineProcess(
            settings,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            join_wait_steps=settings.join_wait_steps,
        )
    else:
        engine = BatchingEngine(
            load or explained_loader(settings),
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            join_wait_steps=settings.join_wait_steps,
            cache=CacheOptions.from_settings(settings),
        )
    return Runtime(settings, engine)

"""What the HTTP layer needs at run time: the engine and the audio intake, with their
life cycle. Built by ``create_runtime`` and handed to ``create_app``; no globals."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable

from oai_audio_server.audio.intake import AudioIntake
from oai_audio_server.engine.cache_plan import CacheOptions
from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.engine.process import EngineProcess
from oai_audio_server.engine.scheduler import BatchingEngine
from oai_audio_server.engine.types import Engine
from oai_audio_server.models.registry import PromptBuilder
from oai_audio_server.settings import Settings


class Runtime:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        # Decoding is CPU work kept off the event loop; a small pool bounds its threads.
        self._audio_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="oas-audio"
        )
        self._intake: AudioIntake | None = None
        self._prompt_builder: PromptBuilder | None = None

    @property
    def intake(self) -> AudioIntake:
        if self._intake is None:
            self._intake = AudioIntake(self.settings, self.engine.bundle.mel, self._audio_pool)
        return self._intake

    @property
    def prompt_builder(self) -> PromptBuilder:
        if self._prompt_builder is None:
            self._prompt_builder = self.engine.bundle.prompt_builder()
        return self._prompt_builder

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.close()
        self._audio_pool.shutdown(wait=False, cancel_futures=True)


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
            load or (lambda: load_bundle(settings)),
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            join_wait_steps=settings.join_wait_steps,
            cache=CacheOptions.from_settings(settings),
        )
    return Runtime(settings, engine)

"""One clear line for a model that failed to load: what the server prints as it exits,
and what /health, the 503 replies and a Ray replica's health check show. The (long,
chained) traceback is logged at DEBUG."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from oai_audio_server.engine.loader import ModelBundle, load_bundle
from oai_audio_server.logging_setup import ExplainedError
from oai_audio_server.settings import Settings

logger = logging.getLogger(__name__)


class ModelLoadError(ExplainedError, RuntimeError):
    """A failed load, with a message that says what failed and what to do."""


def _root_cause(error: BaseException) -> BaseException:
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        cause = error.__cause__ or error.__context__
        if cause is None:
            break
        error = cause
    return error


def explain_load_failure(model: str, error: BaseException) -> str:
    root = _root_cause(error)
    text = str(root).strip()
    cause = type(root).__name__ + (f": {text.splitlines()[0]}" if text else "")
    if Path(model).expanduser().is_dir():
        return f"loading the checkpoint in {model} failed: {cause}"
    from oai_audio_server.hub import HubError, hub_order, is_model_id

    if isinstance(root, HubError | FileNotFoundError) or not is_model_id(model):
        return text.splitlines()[0] if text else cause  # already says what to do
    hub = hub_order(model, "auto")[0].title
    return (
        f"could not get the model {model!r} from {hub} ({cause}); check the network "
        "or proxy settings, or pass a local checkpoint directory as MODEL instead"
    )


def explained_loader(settings: Settings) -> Callable[[], ModelBundle]:
    """``load_bundle`` that raises a ModelLoadError whose message is one clear line (the
    original error chained, and its traceback logged at DEBUG)."""

    def load() -> ModelBundle:
        try:
            return load_bundle(settings)
        except Exception as error:
            line = explain_load_failure(settings.model, error)
            logger.debug("model failed to load: %s", line, exc_info=True)
            raise ModelLoadError(line) from error

    return load

"""Turning MODEL into a checkpoint directory: a local directory as is, a model id
downloaded from the Hugging Face hub or from ModelScope.

Before a download the chosen hub's endpoint is asked once, with a short timeout, so that
a machine without network gets one clear line at once instead of a library's retries.
When the hub cannot be reached, a copy already in the hub's local cache is used.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 5.0
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
LOCAL_HINT = "a local checkpoint directory works too: oai-audio-server serve /path/to/checkpoint"


class HubError(RuntimeError):
    """A model id that could not be fetched; the message is one line for the user."""


@dataclass(frozen=True)
class Hub:
    name: str  # as --hub spells it
    title: str  # as people spell it

    def endpoint(self, environ: Mapping[str, str]) -> str:
        if self.name == "huggingface":
            return environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        if environ.get("MODELSCOPE_ENDPOINT"):
            return environ["MODELSCOPE_ENDPOINT"].rstrip("/")
        scheme = environ.get("MODELSCOPE_URL_SCHEME", "https://")
        return scheme + environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn").rstrip("/")


HUGGINGFACE = Hub("huggingface", "Hugging Face")
MODELSCOPE = Hub("modelscope", "ModelScope")
HUBS = {hub.name: hub for hub in (HUGGINGFACE, MODELSCOPE)}

# (hub, model id, download dir, local files only) -> checkpoint directory
Downloader = Callable[[Hub, str, str | None, bool], Path]
# endpoint -> None when it answers, else why not
Probe = Callable[[str], str | None]


def is_model_id(model: str) -> bool:
    return bool(_MODEL_ID.match(model))


def hub_order(model_id: str, setting: str) -> list[Hub]:
    """The hubs to try, best first. An explicit --hub is the only one tried; auto prefers
    Hugging Face, except for ids owned by lowercase ``qwen`` (ModelScope's spelling of
    the Qwen organisation), and falls back to the other hub when the first is
    unreachable."""
    if setting != "auto":
        return [HUBS[setting]]
    if model_id.split("/", 1)[0] == "qwen":
        return [MODELSCOPE, HUGGINGFACE]
    return [HUGGINGFACE, MODELSCOPE]


def probe(endpoint: str) -> str | None:
    """None when the endpoint answers HTTP at all (any status); else the reason."""
    import httpx

    try:
        httpx.head(endpoint, timeout=PROBE_TIMEOUT_SECONDS, follow_redirects=False)
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def library_download(hub: Hub, model_id: str, download_dir: str | None, offline: bool) -> Path:
    """Download (or, offline, find in the cache) with the hub's own library, which shows
    a progress bar per file on stderr."""
    if hub is HUGGINGFACE:
        from huggingface_hub import snapshot_download as hf_download

        return Path(hf_download(model_id, cache_dir=download_dir, local_files_only=offline))
    from modelscope import snapshot_download as ms_download

    return Path(ms_download(model_id, cache_dir=download_dir, local_files_only=offline))


def resolve(
    model: str,
    hub: str = "auto",
    download_dir: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    reach: Probe | None = None,
    download: Downloader | None = None,
) -> Path:
    """The checkpoint directory for MODEL (a directory, or an id to download)."""
    reach = reach or probe
    download = download or library_download
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or not is_model_id(model):
        raise FileNotFoundError(
            f"model {model!r} is neither a checkpoint directory nor a hub id like "
            "Qwen/Qwen-Audio-Chat"
        )
    environ = os.environ if environ is None else environ
    order = hub_order(model, hub)
    failures: list[str] = []
    for candidate in order:
        endpoint = candidate.endpoint(environ)
        reason = reach(endpoint)
        if reason is None:
            return _download(candidate, model, download_dir, endpoint, download)
        logger.warning("%s (%s) cannot be reached: %s", candidate.title, endpoint, reason)
        failures.append(f"{candidate.title} ({endpoint})")
    cached = _from_cache(
        [h for h in order if may_be_cached(h, model, download_dir, environ)],
        model, download_dir, download,
    )
    if cached is not None:
        return cached
    where = (failures[0] + " cannot" if len(failures) == 1
             else "neither " + " nor ".join(failures) + " can")
    other = [h.name for h in HUBS.values() if h not in order]
    raise HubError(
        f"cannot download {model}: {where} be reached (check the network or proxy"
        + (f", or try --hub {other[0]}" if other else "")
        + "); "
        + LOCAL_HINT
    )


def may_be_cached(
    hub: Hub, model_id: str, download_dir: str | None, env: Mapping[str, str]
) -> bool:
    """Whether the hub's cache has a folder for the id (then the hub's library, which is
    slow to import, is asked whether the copy is complete)."""
    home = Path.home() / ".cache"
    if hub is HUGGINGFACE:
        root = Path(download_dir or env.get("HF_HUB_CACHE")
                    or Path(env.get("HF_HOME") or home / "huggingface") / "hub")
        return (root / ("models--" + model_id.replace("/", "--"))).is_dir()
    root = Path(download_dir or env.get("MODELSCOPE_CACHE") or home / "modelscope")
    names = {model_id, model_id.replace(".", "___")}
    return any((root / sub / name).is_dir()
               for sub in ("", "hub", "models", "hub/models") for name in names)


def _download(
    hub: Hub, model_id: str, download_dir: str | None, endpoint: str, download: Downloader
) -> Path:
    logger.info(
        "downloading %s from %s (%s) into %s; Qwen-Audio-Chat is about 20 GB, and a "
        "finished download is reused next time",
        model_id, hub.title, endpoint, download_dir or f"the {hub.title} cache",
    )
    try:
        return download(hub, model_id, download_dir, False)
    except Exception as error:  # the libraries raise many kinds; the user needs one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise HubError(
            f"cannot download {model_id} from {hub.title} ({endpoint}): "
            f"{type(error).__name__}: {reason}; " + LOCAL_HINT
        ) from error


def _from_cache(
    order: list[Hub], model_id: str, download_dir: str | None, download: Downloader
) -> Path | None:
    for hub in order:
        try:
            found = download(hub, model_id, download_dir, True)
        except Exception:  # not in this hub's cache
            continue
        logger.warning("using the copy of %s in the %s cache: %s", model_id, hub.title, found)
        return found
    return None

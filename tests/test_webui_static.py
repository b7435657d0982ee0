"""The web page, checked without a browser: its files ship in the package, refer to nothing
outside it, every element the script looks up exists, and only its routes skip the key."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

import pytest

from oai_audio_server.webui import build_web_ui_routes, exempt_web_ui, load_static_files


def test_the_page_files_ship_in_the_package() -> None:
    files = load_static_files()
    assert {"index.html", "app.js", "style.css"} <= set(files)
    # Small: plain files, no bundled framework.
    assert sum(len(content) for content in files.values()) < 100_000


def test_no_outside_references() -> None:
    for name, content in load_static_files().items():
        text = content.decode("utf-8")
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), name
        assert "@import" not in text and "url(http" not in text, name


def test_every_element_the_script_uses_exists() -> None:
    files = load_static_files()
    page = files["index.html"].decode()
    script = files["app.js"].decode()
    ids = set(re.findall(r'\bid="([^"]+)"', page))
    used = set(re.findall(r'\$\("([^"]+)"\)', script))
    # Built from a name: $(`view-${view}`) and $(`tab-${view}`).
    used |= {f"{prefix}-{view}" for prefix in ("view", "tab") for view in ("chat", "transcribe")}
    assert used, "no lookups found: the pattern is stale"
    assert used <= ids, sorted(used - ids)


def test_the_key_never_goes_in_a_url() -> None:
    script = load_static_files()["app.js"].decode()
    assert "Authorization: `Bearer ${key}`" in script
    assert not re.search(r"[?&](api_)?key=", script)


def test_only_the_page_is_exempt_from_the_api_key() -> None:
    class Refused(Exception):
        pass

    def guard(connection: Any, handler: Any) -> None:
        raise Refused

    guarded = exempt_web_ui(guard)
    for handler in build_web_ui_routes():  # the page's own routes pass without a key
        asyncio.run(guarded(None, handler))  # type: ignore[arg-type]
    with pytest.raises(Refused):  # any other route still goes through the guard
        asyncio.run(guarded(None, SimpleNamespace(opt={})))  # type: ignore[arg-type]

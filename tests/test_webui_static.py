"""The web page's files, checked without a browser: shipped in the package, no outside
references, and every element the script looks up exists in the page."""

from __future__ import annotations

import re

from oai_audio_server.webui import load_static_files


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

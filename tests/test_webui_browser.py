"""The built-in web page, driven in a real headless Chromium against the real server.

Chromium's fake microphone plays a WAV file, so "Record" makes a real webm/opus recording
that goes to the server like a user's would. One server (with an API key and a small body
limit) and one browser serve every test here; each test reloads the page.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Without
them the tests fail, unless ``OAS_BROWSER_TESTS_OPTIONAL=1`` says they may be skipped.
With ``OAS_UPDATE_SCREENSHOTS=1`` the tests also write the screenshots in docs/images/.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from media import tone, wav_bytes
from server_process import ServerProcess, running_server

from oai_audio_server.webui import load_static_files

API_KEY = "browser-test-key"
MAX_BODY_BYTES = 1_000_000  # a 40 s WAV upload is over it: the 413 test
CHROMIUM = os.environ.get("OAS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OAS_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "images"
DESKTOP = (1280, 800)
PHONE = (390, 844)
T = TypeVar("T")


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


_missing = _browser_missing()
if _missing is not None:
    if os.environ.get("OAS_BROWSER_TESTS_OPTIONAL") == "1":
        pytest.skip(
            f"browser tests skipped: {_missing}; OAS_BROWSER_TESTS_OPTIONAL=1",
            allow_module_level=True,
        )
    pytest.fail(
        f"browser tests need Chromium: {_missing}. Set OAS_BROWSER_TESTS_OPTIONAL=1 to "
        "skip them where no browser can be installed.",
        pytrace=False,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


def wait_for(condition: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    """Poll ``condition`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except WebDriverException as error:  # an element not there yet
            last_error = error
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} ({last_error})")


@pytest.fixture(scope="module")
def ui_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with running_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("webui-logs"),
        "--api-key", API_KEY,
        "--served-model-name", "qwen-audio-chat",
        "--max-body-bytes", str(MAX_BODY_BYTES),
        env={"OMP_NUM_THREADS": "1"},
    ) as process:
        yield process


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("webui-media")
    # What the fake microphone plays: 48 kHz, like a real capture device.
    (folder / "microphone.wav").write_bytes(wav_bytes(tone(3.0, 330.0, 48000), rate=48000))
    (folder / "speech.wav").write_bytes(wav_bytes(tone(4.0, 440.0)))
    (folder / "too-long.wav").write_bytes(wav_bytes(tone(40.0)))  # 1.28 MB
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 20)
    return folder


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("webui-downloads")


@pytest.fixture(scope="module")
def browser(
    media_dir: Path, downloads: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        # The fake microphone: granted without a prompt, playing microphone.wav.
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={media_dir / 'microphone.wav'}",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    # An explicit driver path: Selenium Manager would otherwise look online for one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, server: ServerProcess, key: str | None = API_KEY) -> None:
    """Load the page fresh, with ``key`` saved the way the key form saves it."""
    driver.set_window_size(*DESKTOP)
    driver.get(server.base_url + "/")
    driver.execute_script("localStorage.clear()")
    if key is not None:
        driver.find_element(By.CSS_SELECTOR, "#key-panel summary").click()
        field = driver.find_element(By.ID, "api-key")
        field.clear()
        field.send_keys(key)
        driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    driver.get(server.base_url + "/ui/")  # a reload: the key must survive it
    wait_for(lambda: element(driver, "health").text == "model ready", "the ready badge")


def element(driver: Any, element_id: str) -> WebElement:
    found: WebElement = driver.find_element(By.ID, element_id)
    return found


def set_value(driver: Any, element_id: str, value: str) -> None:
    field = element(driver, element_id)
    field.clear()
    field.send_keys(value)


def open_settings(driver: Any) -> None:
    if not element(driver, "settings").get_attribute("open"):
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()


def screenshot(driver: Any, name: str) -> None:
    if os.environ.get("OAS_UPDATE_SCREENSHOTS") != "1":
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for label, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
        # An exact viewport (a window size would include the window's frame).
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1,
             "mobile": label == "phone"},
        )
        time.sleep(0.3)  # let the layout settle
        driver.execute_script("const m = $('messages'); m.scrollTop = m.scrollHeight")
        driver.get_screenshot_as_file(str(SCREENSHOTS / f"web-ui-{name}-{label}.png"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def last_reply(driver: Any) -> WebElement:
    replies = driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")
    if not replies:
        error = element(driver, "chat-error").text
        if error:
            raise AssertionError(f"no assistant message; the page says: {error!r}")
        raise NoSuchElementException("no assistant message yet")
    reply: WebElement = replies[-1]
    return reply


def reply_done(driver: Any) -> bool:
    return bool(last_reply(driver).get_attribute("data-done"))


def test_page_is_self_contained(ui_server: ServerProcess, browser: Any) -> None:
    root = httpx.get(ui_server.base_url + "/", timeout=5)
    assert root.status_code == 302 and root.headers["location"].endswith("/ui/")
    page = httpx.get(ui_server.base_url + "/ui/", timeout=5)  # no key needed for the page
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text
    assert httpx.get(ui_server.base_url + "/ui/secret.py", timeout=5).status_code == 404
    # The API still wants the key.
    assert httpx.get(ui_server.base_url + "/v1/models", timeout=5).status_code == 401

    open_page(browser, ui_server)
    origin = ui_server.base_url
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert urls, "the page loaded no resources"
    assert all(url.startswith(origin + "/") for url in urls), urls
    assert API_KEY not in browser.current_url
    stored = browser.execute_script("return localStorage.getItem('oai-audio-server.api-key')")
    assert stored == API_KEY
    models = wait_for(
        lambda: [o.get_attribute("value") for o in Select(element(browser, "model")).options],
        "the model list",
    )
    assert models == ["qwen-audio-chat"]


def test_wrong_api_key_shows_the_401_message(ui_server: ServerProcess, browser: Any) -> None:
    open_page(browser, ui_server, key="not-the-key")
    error = wait_for(lambda: element(browser, "chat-error").text, "the error message")
    assert "API key rejected" in error and "Incorrect API key" in error
    assert "not-the-key" not in browser.current_url


def test_record_send_stream_and_keep_history(ui_server: ServerProcess, browser: Any) -> None:
    open_page(browser, ui_server)
    open_settings(browser)
    set_value(browser, "system-prompt", "You are a helpful assistant.")
    # Sampled, not greedy: the tiny model's greedy answer to some recordings is empty.
    set_value(browser, "temperature", "1")
    set_value(browser, "max-tokens", "12")

    record = element(browser, "record")
    record.click()
    wait_for(lambda: "Stop recording" in record.text, "the recorder to start")
    time.sleep(1.5)
    record.click()
    wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#attachments li audio"),
        "the recording's player",
    )
    name = browser.find_element(By.CSS_SELECTOR, "#attachments .file-name").text
    assert name.startswith("recording-") and name.endswith(".webm"), name

    set_value(browser, "prompt", "What do you hear?")
    element(browser, "send").click()
    wait_for(lambda: reply_done(browser), "the first reply")
    answer = last_reply(browser).find_element(By.CSS_SELECTOR, ".text")
    assert answer.get_attribute("textContent"), "no text streamed in"
    user = browser.find_elements(By.CSS_SELECTOR, "#messages .message.user")
    assert len(user) == 1 and user[0].find_elements(By.TAG_NAME, "audio")
    assert element(browser, "chat-error").get_attribute("hidden") is not None

    # A second turn, text only: the request carries the first turn with its audio.
    set_value(browser, "prompt", "And again?")
    element(browser, "send").click()
    wait_for(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done]")) == 2,
        "the second reply",
    )
    history = browser.execute_script("return chat.history")
    assert [message["role"] for message in history] == ["user", "assistant"] * 2
    first = history[0]["content"]
    assert first[0]["type"] == "input_audio" and first[0]["input_audio"]["format"] == "webm"
    assert first[0]["input_audio"]["data"], "the recording was not kept"
    assert history[2]["content"] == "And again?"
    # Settings closed for the screenshots: the conversation and the composer show.
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    set_value(browser, "prompt", "Is it speech or music?")
    screenshot(browser, "chat")
    set_value(browser, "prompt", "")

    element(browser, "clear").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages .message")
    assert browser.execute_script("return chat.history.length") == 0


def health_stats(server: ServerProcess) -> dict[str, Any]:
    reply = httpx.get(
        server.base_url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
    )
    assert reply.status_code == 200, reply.text
    stats: dict[str, Any] = reply.json()
    return stats


def running_rows(server: ServerProcess) -> int:
    stats = health_stats(server)
    return int(stats["batch_size"]) + int(stats["queue_depth"])


def test_stop_cancels_generation_on_the_server(ui_server: ServerProcess, browser: Any) -> None:
    open_page(browser, ui_server)
    open_settings(browser)
    # The tiny checkpoint's greedy answer to "Hello" runs 603 tokens: still generating
    # when Stop is clicked (a sampled one may end after a few).
    set_value(browser, "temperature", "0")
    set_value(browser, "max-tokens", "2000")
    set_value(browser, "prompt", "Hello")
    cancelled_before = health_stats(ui_server).get("cancelled")
    element(browser, "send").click()

    def streamed_text() -> str:
        reply = last_reply(browser)
        text: str = reply.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
        return text if "streaming" in (reply.get_attribute("class") or "") else ""

    wait_for(streamed_text, "streamed text while the reply is generating")
    assert running_rows(ui_server) >= 1
    browser.execute_script("$('stop').click()")  # at once: no scrolling into view first
    wait_for(lambda: reply_done(browser), "the stopped reply")
    note = last_reply(browser).find_element(By.CSS_SELECTOR, ".tools").text
    assert "stopped" in note and "max tokens" not in note, f"the reply had ended: {note!r}"
    wait_for(lambda: running_rows(ui_server) == 0, "the server to free the row", timeout=10)
    if cancelled_before is not None:  # the engine counts cancellations: this was one
        assert health_stats(ui_server)["cancelled"] == cancelled_before + 1
    assert element(browser, "send").is_enabled()


def choose_transcription_file(driver: Any, path: Path) -> None:
    element(driver, "t-file").send_keys(str(path))
    wait_for(lambda: element(driver, "t-file-name").text == path.name, "the chosen file")


def test_transcribe_to_srt_and_download(
    ui_server: ServerProcess, browser: Any, media_dir: Path, downloads: Path
) -> None:
    open_page(browser, ui_server)
    element(browser, "tab-transcribe").click()
    choose_transcription_file(browser, media_dir / "speech.wav")
    assert browser.find_elements(By.CSS_SELECTOR, "#t-player audio")
    Select(element(browser, "t-format")).select_by_value("srt")
    element(browser, "t-run").click()
    wait_for(lambda: element(browser, "t-result").is_displayed(), "the transcription")
    raw = element(browser, "t-raw").text
    assert "-->" in raw, raw
    rows = browser.find_elements(By.CSS_SELECTOR, "#t-segments tbody tr")
    assert rows and rows[0].find_elements(By.TAG_NAME, "td")[0].text == "00:00.00"
    screenshot(browser, "transcribe")

    link = element(browser, "t-download")
    assert link.get_attribute("download") == "speech.srt"
    link.click()
    target = downloads / "speech.srt"
    wait_for(target.exists, "the downloaded subtitle file", timeout=10)
    saved = wait_for(lambda: target.read_text(encoding="utf-8"), "the file's content")
    assert "-->" in saved and saved.strip() == raw.strip()


def test_errors_show_in_place(ui_server: ServerProcess, browser: Any, media_dir: Path) -> None:
    open_page(browser, ui_server)
    element(browser, "tab-transcribe").click()
    box = element(browser, "transcribe-error")

    choose_transcription_file(browser, media_dir / "too-long.wav")
    element(browser, "t-run").click()
    text = wait_for(lambda: box.text, "the 413 message")
    assert text.startswith("Too large for this server") and "max-body-bytes" in text, text

    choose_transcription_file(browser, media_dir / "broken.wav")
    element(browser, "t-run").click()
    text = wait_for(
        lambda: box.text if box.text.startswith("The request was refused") else "",
        "the 400 message",
    )
    assert "audio" in text.lower(), text


class LoadingServer(BaseHTTPRequestHandler):
    """The page's files, and a /health that says the model is loading (as the real one
    does for the first seconds or minutes): the loading state without waiting for it."""

    files = load_static_files()

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        name = self.path.split("?", 1)[0].removeprefix("/ui/") or "index.html"
        if self.path.startswith("/ui/") and name in self.files:
            kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
            self.reply(200, self.files[name], kind[name.rsplit(".", 1)[-1]])
        else:
            message = "the model is loading" if self.path == "/health" else "not here"
            body = {"error": {"message": message, "type": "service_unavailable",
                              "param": None, "code": "model_not_ready"}}
            self.reply(503, json.dumps(body).encode(), "application/json")

    def reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_page_says_when_the_model_is_loading(browser: Any) -> None:
    stand_in = ThreadingHTTPServer(("127.0.0.1", 0), LoadingServer)
    thread = threading.Thread(target=stand_in.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{stand_in.server_address[1]}/ui/")
        wait_for(lambda: element(browser, "health").text == "model loading…", "the badge")
        assert not element(browser, "send").is_enabled()
    finally:
        stand_in.shutdown()
        stand_in.server_close()
        thread.join(5)


def test_live_captions_from_the_microphone(ui_server: ServerProcess, browser: Any) -> None:
    """Live: the fake microphone's tone -> /v1/realtime (the key as a subprotocol) ->
    a caption line while it plays, written out when Stop commits it."""
    open_page(browser, ui_server)
    element(browser, "tab-live").click()
    assert browser.current_url.endswith("#live")
    element(browser, "live-toggle").click()
    wait_for(lambda: element(browser, "live-status").text == "listening…", "the session")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#live-captions p"),
             "the VAD to hear speech")
    element(browser, "live-toggle").click()  # Stop: the line still being heard is committed
    done = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#live-captions p[data-done]"),
        "a finished caption", timeout=60,
    )
    assert "pending" not in (done[0].get_attribute("class") or "")
    wait_for(lambda: element(browser, "live-toggle").text == "Start", "the session to close")
    assert element(browser, "live-status").text == "stopped"
    assert not element(browser, "live-error").is_displayed()
    wait_for(lambda: httpx.get(ui_server.base_url + "/health",
                               headers={"Authorization": f"Bearer {API_KEY}"}
                               ).json()["batch_size"] == 0, "an empty batch")

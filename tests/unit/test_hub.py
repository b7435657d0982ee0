"""Which hub a model id comes from, and what the user sees when it cannot be reached."""

from __future__ import annotations

from pathlib import Path

import pytest

from oai_audio_server.hub import (
    HUGGINGFACE,
    MODELSCOPE,
    Hub,
    HubError,
    hub_order,
    is_model_id,
    may_be_cached,
    resolve,
)

ENV = {"HF_ENDPOINT": "http://hf.test", "MODELSCOPE_ENDPOINT": "http://ms.test"}


class FakeHubs:
    """Reachable endpoints, and what each hub has downloaded or cached."""

    def __init__(self, up: set[str], cached: dict[str, Path] | None = None) -> None:
        self.up = up
        self.cached = cached or {}
        self.downloads: list[tuple[str, str, str | None, bool]] = []

    def reach(self, endpoint: str) -> str | None:
        return None if endpoint in self.up else "ConnectError: refused"

    def download(self, hub: Hub, model_id: str, download_dir: str | None, offline: bool) -> Path:
        self.downloads.append((hub.name, model_id, download_dir, offline))
        if offline:
            if hub.name in self.cached:
                return self.cached[hub.name]
            raise FileNotFoundError("not cached")
        return Path("/downloaded") / hub.name


def run(model: str, hub: str, fake: FakeHubs) -> Path:
    return resolve(model, hub, "/dl", environ=ENV, reach=fake.reach, download=fake.download)


def test_auto_prefers_hugging_face_and_lowercase_qwen_is_modelscope() -> None:
    assert hub_order("Qwen/Qwen-Audio-Chat", "auto") == [HUGGINGFACE, MODELSCOPE]
    assert hub_order("Qwen/Qwen2-Audio-7B-Instruct", "auto") == [HUGGINGFACE, MODELSCOPE]
    assert hub_order("qwen/Qwen-Audio-Chat", "auto") == [MODELSCOPE, HUGGINGFACE]
    assert hub_order("qwen/Qwen-Audio-Chat", "huggingface") == [HUGGINGFACE]
    assert hub_order("Qwen/Qwen-Audio-Chat", "modelscope") == [MODELSCOPE]


def test_download_from_the_first_reachable_hub() -> None:
    fake = FakeHubs(up={"http://hf.test", "http://ms.test"})
    assert run("Qwen/Qwen-Audio-Chat", "auto", fake) == Path("/downloaded/huggingface")
    assert fake.downloads == [("huggingface", "Qwen/Qwen-Audio-Chat", "/dl", False)]


def test_auto_falls_back_to_the_other_hub() -> None:
    fake = FakeHubs(up={"http://ms.test"})
    assert run("Qwen/Qwen-Audio-Chat", "auto", fake) == Path("/downloaded/modelscope")


def test_explicit_hub_never_falls_back() -> None:
    fake = FakeHubs(up={"http://ms.test"})
    with pytest.raises(HubError) as raised:
        run("Qwen/Qwen-Audio-Chat", "huggingface", fake)
    message = str(raised.value)
    assert "\n" not in message
    assert "Hugging Face (http://hf.test) cannot be reached" in message
    assert "local checkpoint directory" in message
    assert "try --hub modelscope" in message
    assert fake.downloads == []  # nothing in the cache: the library is not even asked


def test_unreachable_hubs_use_a_cached_copy(tmp_path: Path) -> None:
    (tmp_path / "hub" / "Qwen" / "Qwen-Audio-Chat").mkdir(parents=True)
    fake = FakeHubs(up=set(), cached={"modelscope": Path("/cache/ms")})
    found = resolve("Qwen/Qwen-Audio-Chat", "auto", str(tmp_path), environ=ENV,
                    reach=fake.reach, download=fake.download)
    assert found == Path("/cache/ms")
    assert fake.downloads == [("modelscope", "Qwen/Qwen-Audio-Chat", str(tmp_path), True)]


def test_cache_folders_of_either_hub(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_CACHE": str(tmp_path / "ms")}
    assert not may_be_cached(HUGGINGFACE, "Qwen/Qwen-Audio-Chat", None, env)
    (tmp_path / "hf" / "hub" / "models--Qwen--Qwen-Audio-Chat").mkdir(parents=True)
    assert may_be_cached(HUGGINGFACE, "Qwen/Qwen-Audio-Chat", None, env)
    assert not may_be_cached(MODELSCOPE, "qwen/Qwen-Audio-Chat", None, env)
    (tmp_path / "ms" / "models" / "qwen" / "Qwen-Audio-Chat").mkdir(parents=True)
    assert may_be_cached(MODELSCOPE, "qwen/Qwen-Audio-Chat", None, env)


def test_both_unreachable_names_both() -> None:
    with pytest.raises(HubError, match="neither Hugging Face .* nor ModelScope .* can be reached"):
        run("Qwen/Qwen-Audio-Chat", "auto", FakeHubs(up=set()))


def test_a_failed_download_is_one_line() -> None:
    def broken(hub: Hub, model_id: str, download_dir: str | None, offline: bool) -> Path:
        raise RuntimeError("404 Client Error\nRepository Not Found for url: ...")

    with pytest.raises(HubError) as raised:
        resolve("Qwen/No-Such-Model", "huggingface", None, environ=ENV,
                reach=lambda endpoint: None, download=broken)
    assert str(raised.value).count("\n") == 0
    assert "RuntimeError: 404 Client Error" in str(raised.value)


def test_directories_and_non_ids(tmp_path: Path) -> None:
    assert resolve(str(tmp_path)) == tmp_path
    for model in (str(tmp_path / "missing"), "./ckpt", "just-a-name", "a/b/c"):
        with pytest.raises(FileNotFoundError):
            resolve(model, reach=lambda endpoint: pytest.fail("no hub for a path"))
    assert is_model_id("Qwen/Qwen2-Audio-7B-Instruct") and not is_model_id("/abs/path")


def test_endpoints_follow_the_hub_variables() -> None:
    assert HUGGINGFACE.endpoint({}) == "https://huggingface.co"
    assert HUGGINGFACE.endpoint({"HF_ENDPOINT": "https://hf-mirror.com/"}) == "https://hf-mirror.com"
    assert MODELSCOPE.endpoint({}) == "https://www.modelscope.cn"
    assert MODELSCOPE.endpoint({"MODELSCOPE_DOMAIN": "127.0.0.1:9"}) == "https://127.0.0.1:9"

"""The README's quick start, followed as a newcomer would: a fresh virtual environment,
the install-and-serve command (on the tiny checkpoint directory instead of a real one),
`curl /v1/models`, then every "Talking to it" example against that server.

The commands come from the README blocks marked ``<!-- run: quickstart -->``, so the
README and this test cannot drift. What is changed, and why:
- the venv sees the packages of the interpreter running the tests (a ``.pth`` file
  naming its site directories: the Quick start's own venv, or CI's system Python; a
  ``--system-site-packages`` venv would see the base interpreter's instead), and pip
  installs only this project (``--no-deps --no-build-isolation``): a full install takes
  minutes. The old setuptools that Python 3.11 puts in a venv is removed, so that the
  test extras' newer one builds the editable install;
- ``/path/to/Qwen-Audio-Chat`` is the tiny checkpoint, and port 8000 a free port (set
  through ``OAS_PORT``, so the serve command itself is unchanged);
- the snippets run from a copy of the repository root's ``examples/``, as written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from doc_blocks import ROOT, runnable
from server_process import ServerProcess, free_port, stop, wait_ready

STEP_TIMEOUT = 120


def shell(script: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-euc", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=STEP_TIMEOUT)
    assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def running_site_dirs() -> list[str]:
    """The site directories of the interpreter running the tests, in its order."""
    return [entry for entry in sys.path
            if entry.rstrip("/").endswith(("site-packages", "dist-packages"))
            and Path(entry).is_dir()]


def see_running_packages(venv: Path) -> None:
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "running-interpreter.pth").write_text("\n".join(running_site_dirs()) + "\n")


def test_readme_quick_start(tmp_path: Path, tiny_checkpoint: Path) -> None:
    blocks = runnable("quickstart")
    venv_step, serve_step, check_step, *talking = blocks
    port = free_port()
    venv = tmp_path / ".venv"
    env = {**os.environ, "OAS_PORT": str(port)}
    env.pop("OAS_MODEL", None)

    # 1. the virtual environment
    assert venv_step.body.strip() == "python3 -m venv .venv && . .venv/bin/activate"
    activate = venv_step.body.replace("-m venv .venv", f"-m venv {venv}")
    activate = activate.replace(". .venv/bin/activate", f". {venv}/bin/activate")
    shell(activate, ROOT, env)
    see_running_packages(venv)

    # 3. install and serve
    install, serve = serve_step.body.strip().split(" && ")
    assert install == "pip install -e ."
    shell(f". {venv}/bin/activate && pip uninstall --quiet --yes setuptools && "
          f"pip install --quiet --no-deps --no-build-isolation -e {ROOT}", ROOT, env)
    assert (venv / "bin" / "oai-audio-server").exists()
    serve = serve.replace("/path/to/Qwen-Audio-Chat", str(tiny_checkpoint))
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["bash", "-c", f". {venv}/bin/activate && exec {serve}"], cwd=tmp_path, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_ready(server)
        # 4. curl /v1/models
        models = json.loads(shell(check_step.body.replace("8000", str(port)), tmp_path, env))
        assert [m["id"] for m in models["data"]] == ["Qwen/Qwen-Audio-Chat"]

        # Talking to it, from the repository root (a copy: the snippets only read it)
        shutil.copytree(ROOT / "examples", tmp_path / "examples")
        assert all("examples/speech.mp3" in block.body for block in talking
                   if "Hello!" not in block.body)
        outputs = []
        for block in talking:
            body = block.body.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            if block.language == "python":
                script = tmp_path / "snippet.py"
                script.write_text(body)
                outputs.append(shell(f". {venv}/bin/activate && python {script}", tmp_path, env))
            else:
                outputs.append(shell(f"set -o pipefail; {body}", tmp_path, env))
        assert len(outputs) == 4
        chat, stream, transcript, srt = outputs
        assert chat.strip() and transcript.strip()
        assert "chat.completion.chunk" in stream and "data: [DONE]" in stream
        assert " --> " in srt
        assert process.poll() is None, server.log()
    finally:
        assert stop(server) == 0, server.log()[-3000:]

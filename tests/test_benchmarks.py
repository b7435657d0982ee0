"""The benchmark scripts the README quotes still run, on a few small requests.

What they print is measured elsewhere (README); here they only have to finish and
report what they are meant to report, so that a change to the server or its flags
cannot leave them broken unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_serving_benchmark_runs(tiny_checkpoint: Path) -> None:
    output = run("serving_benchmark.py", str(tiny_checkpoint), "--concurrency", "1,2",
                 "--seconds", "1.5", "--max-tokens", "8", "--audio-seconds", "1",
                 "--torch-threads", "1")
    for clients in ("1", "2"):
        (row,) = table_rows(output, clients)
        # Requests answered, none failed, tokens came back, a decode step and a floor.
        assert int(row[1]) >= 1 and row[2] == "0", output
        assert float(row[3]) > 0, output
        assert row[8].endswith("ms") and float(row[8][:-2]) > 0, output
        assert row[9].endswith("ms") and float(row[9][:-2]) > 0, output


def test_soak_runs_clean(tiny_checkpoint: Path) -> None:
    output = run("soak.py", str(tiny_checkpoint), "--clients", "4", "--requests", "20",
                 "--warmup", "4", "--torch-threads", "1")
    assert table_rows(output, "answered") == [["answered", "20 of 20"]], output
    assert table_rows(output, "errors") == [["errors", "0 (warm-up 0)"]], output
    assert table_rows(output, "leaked temp files") == [["leaked temp files", "0"]], output


def test_loop_stalls_benchmark_runs(tiny_checkpoint: Path) -> None:
    output = run("loop_stalls.py", str(tiny_checkpoint), "--cases", "cjk-text")
    (row,) = [cells for cells in (line.strip("|").split("|") for line in output.splitlines())
              if "CJK" in cells[0]]
    assert row[1].strip() == "400", output  # refused: the text cannot fit
    assert row[3].strip().startswith(("<=", ">")) and float(row[4]) > 0, output


def test_serving_benchmark_builds_and_runs_a_qwen2_audio_checkpoint() -> None:
    """The GPU benchmark's path for Qwen2-Audio (random weights, built by our own model
    class; here the tiny shapes on the CPU)."""
    output = run("serving_benchmark.py", "--family", "qwen2-audio", "--concurrency", "2",
                 "--seconds", "1.5", "--max-tokens", "8", "--audio-seconds", "1",
                 "--torch-threads", "1")
    (row,) = table_rows(output, "2")
    assert int(row[1]) >= 1 and row[2] == "0", output
    assert float(row[3]) > 0, output


def test_the_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path: Path) -> None:
    """The prepared GPU script's smoke mode (tiny shapes on the CPU) runs every step but
    the HTTP one and writes its JSON report: the script a GPU session runs stays working."""
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--skip-http",
         "--seconds", "1", "--levels", "1,2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["steps"]) == {"imports", "model", "parity", "engine", "prefix", "floor"}
    prefix = report["steps"]["prefix"]
    assert prefix["on"]["hit_tokens"] > 250 and prefix["off"]["hit_tokens"] == 0  # 10 s audio
    assert prefix["turn2_vs_cold"] > 0 and prefix["tokens_per_s_on_vs_off"] > 0
    assert report["steps"]["parity"]["graph_vs_eager_rel_32"] == 0.0
    levels = report["steps"]["engine"]["levels"]
    assert [level["clients"] for level in levels] == [1, 2]
    assert all(level["errors"] == 0 and level["tokens_per_s"] > 0 for level in levels)


def test_realtime_latency_runs(tiny_checkpoint: Path) -> None:
    output = run("realtime_latency.py", str(tiny_checkpoint), "--sessions", "2",
                 "--turns", "1", "--turn-seconds", "0.5", "--torch-threads", "1")
    (row,) = table_rows(output, "2")
    # Both turns transcribed, no error, and times reported.
    assert row[1:3] == ["2", "0"], output
    assert all(cell.endswith("ms") for cell in row[3:]), output


def test_grammar_step_benchmark_runs() -> None:
    output = run("grammar_step.py", "--rows", "4", "--grammar-rows", "2", "--steps", "6",
                 "--rounds", "1")
    rows = {cells[1]: cells for cells in table_rows(output, "4")}
    assert set(rows) == {"0", "2"}, output
    assert rows["0"][2].endswith("ms") and float(rows["2"][3]) > 0, output


def test_multi_turn_benchmark_runs_with_caching_on_and_off(tiny_checkpoint: Path) -> None:
    output = run("multi_turn.py", str(tiny_checkpoint), "--conversations", "2", "--turns",
                 "2", "--audio-seconds", "10", "--max-tokens", "4", "--torch-threads", "1")
    turns = {(row[0], row[1]): row for row in table_rows(output, "on")
             + table_rows(output, "off") if len(row) == 6}
    assert set(turns) == {("on", "1"), ("on", "2"), ("off", "1"), ("off", "2")}, output
    # Turn 2 starts from turn 1's blocks (audio included) only with caching on.
    assert int(turns[("on", "2")][5]) > 250 + int(turns[("on", "1")][5]), output
    assert int(turns[("off", "2")][5]) == 0, output
    totals = [row for row in table_rows(output, "on") + table_rows(output, "off")
              if len(row) == 5]
    assert [(row[1], row[2]) for row in totals] == [("4", "0"), ("4", "0")], output
    assert all(float(row[4]) > 0 for row in totals), output

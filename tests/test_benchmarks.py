"""The benchmark scripts the README quotes still run, on a few small requests.

What they print is measured elsewhere (README); here they only have to finish and
report what they are meant to report, so that a change to the server or its flags
cannot leave them broken unnoticed.
"""

from __future__ import annotations

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
                 "--requests", "4", "--rounds", "1", "--max-tokens", "8",
                 "--torch-threads", "1")
    for clients in ("1", "2"):
        rows = table_rows(output, clients)
        assert len(rows) == 2, output  # streamed and not streamed
        # All 4 answered, none failed, and tokens came back.
        assert all(row[1] == "4" and row[2] == "0" for row in rows), output
        assert all(float(row[4]) > 0 for row in rows), output
    assert len(table_rows(output, "streaming")) == 1 and len(table_rows(output, "json")) == 1
    assert "median 8-client throughput ratio" in output


def test_soak_runs_clean(tiny_checkpoint: Path) -> None:
    output = run("soak.py", str(tiny_checkpoint), "--clients", "4", "--requests", "20",
                 "--warmup", "4", "--torch-threads", "1")
    assert table_rows(output, "answered") == [["answered", "20 of 20"]], output
    assert table_rows(output, "errors") == [["errors", "0 (warm-up 0)"]], output
    assert table_rows(output, "leaked temp files") == [["leaked temp files", "0"]], output

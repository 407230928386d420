"""scripts/bench.py still runs: a quick run of two cheap rows, in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
ROWS = ["farpool-threads", "stdlib-threads"]
METRICS = ["latency", "submit", "map", "startup", "sleep"]


@pytest.mark.timeout(180)
def test_quick_bench_prints_a_row_of_numbers_per_executor(tmp_path):
    raw = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", ",".join(ROWS),
         "--metrics", ",".join(METRICS), "--json", str(raw)],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in ROWS:
            table[cells[0]] = cells[1:]
    assert sorted(table) == sorted(ROWS), proc.stdout
    for name, cells in table.items():
        assert len(cells) == len(METRICS), (name, cells)
        for cell in cells:
            # A median, maybe followed by a ratio: "58.1" or "1,234 (2.10×)".
            assert re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?( \([0-9.,]+×\))?", cell), (name, cell)

    numbers = json.loads(raw.read_text())
    for name in ROWS:
        for metric in METRICS:
            assert numbers["medians"][name][metric] > 0, (name, metric)
    assert not numbers["errors"] and not numbers["skipped"]


def test_unknown_row_is_refused():
    proc = subprocess.run([sys.executable, str(BENCH), "--only", "no-such-row"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "farpool-processes" in proc.stderr  # the message lists the known rows

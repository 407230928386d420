"""scripts/bench.py still runs: a quick run of two cheap rows, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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


@pytest.mark.timeout(180)
def test_load_runs_the_rows_idle_and_loaded_and_stops_its_load(tmp_path):
    # What a user quoting figures sees: the same rows in two machine states, side by
    # side, and no busy process left behind.
    raw = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--load", "--only", ",".join(ROWS),
         "--metrics", "latency", "--json", str(raw)],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "### idle" in out and "### loaded" in out and "### both states" in out, out
    both = out.split("### both states", 1)[1]
    row = next(line for line in both.splitlines() if line.startswith("| stdlib-threads"))
    assert re.fullmatch(r"\| stdlib-threads \| [0-9.,]+ \| [0-9.,]+ \|", row), row
    numbers = json.loads(raw.read_text())
    assert numbers["medians"]["stdlib-threads"]["latency"] > 0
    assert numbers["loaded"]["medians"]["stdlib-threads"]["latency"] > 0
    spinners = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "os.nice(19)" not in spinners


def test_unknown_row_is_refused():
    proc = subprocess.run([sys.executable, str(BENCH), "--only", "no-such-row"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "farpool-processes" in proc.stderr  # the message lists the known rows


FLOORS = Path(__file__).resolve().parents[1] / "scripts" / "floors.py"


@pytest.mark.timeout(120)
def test_floors_prints_a_bare_pyzmq_round_trip_for_every_shape(tmp_path):
    raw = tmp_path / "floors.json"
    # Its own short TMPDIR (an ipc:// path must fit in a socket address), to see that
    # the script removes what it made there.
    scratch = Path(tempfile.mkdtemp(prefix="fpf-"))
    try:
        proc = subprocess.run([sys.executable, str(FLOORS), "--number", "50", "--repeat", "1",
                               "--json", str(raw)], capture_output=True, text=True, timeout=100,
                              env={**os.environ, "TMPDIR": str(scratch)})
        left = list(scratch.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and re.fullmatch(r"[0-9]+", cells[1]):
            rows[cells[0]] = int(cells[1])
    shapes = ["inproc threads", "ipc direct", "tcp direct", "tcp direct, CURVE", "tcp broker",
              "tcp broker, CURVE"]
    assert list(rows) == shapes, proc.stdout
    assert all(value > 0 for value in rows.values())
    assert sorted(json.loads(raw.read_text())) == sorted(shapes)
    assert not left  # its ipc directory is gone

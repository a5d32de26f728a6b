"""Smoke test: the data throughput benchmark runs end to end on a tiny set (its figures are never asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "data_throughput.py"


@pytest.mark.slow
def test_benchmark_quick_runs_and_prints_every_row(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--images", "3", "--repeats", "3",
                             "--convert-copies", "1", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("(", "conversion"))]
    labels = [r[:3] for r in rows if r.startswith("(")]
    assert labels == ["(a)", "(b)", "(b)", "(c)", "(c)", "(d)", "(d)"]
    assert sum(r.startswith("conversion") for r in rows) == 2
    for row in rows:
        assert float(row[58:].split()[0]) > 0

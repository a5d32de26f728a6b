"""benchmarks/gpu_check.py: its CPU dry run executes every check's code path (trainer under ZeRO-1 and ZeRO-3,
math and SDPA model steps, greedy and beam generation), and it refuses what the machine cannot do in one sentence.
Its figures are never asserted (no timing asserts); the GPU run itself needs a CUDA machine."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(*args, timeout=120):
    # its own session, so a timeout also ends the trainer processes it started (no orphans on a shared machine)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=NO_GPU, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_cpu_dry_run_executes_every_check(tmp_path):
    out = tmp_path / "rows.json"
    # 1–3 minutes of CPU time; far longer in wall time on a loaded machine
    result = run("--device", "cpu", "--tiny", "--json", str(out), timeout=850)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = json.loads(out.read_text())
    assert all(r["ok"] for r in rows), rows
    by_check = {}
    for r in rows:
        by_check.setdefault(r["check"], []).append(r)
    trainer = by_check["trainer"]
    assert [("ZeRO-1" in r["config"], "ZeRO-3" in r["config"]) for r in trainer] == [(True, False), (False, True)]
    for r in trainer:
        assert r["extra"]["steps"] == 2 and r["tokens_per_s"] > 0 and r["note"].startswith("gloo;")
    # one rank: ZeRO-1 and ZeRO-3 train the same model on the same data
    z1, z3 = (r["extra"]["losses"] for r in trainer)
    assert z1 == pytest.approx(z3, rel=1e-4)
    steps = by_check["model step"]
    assert [r["config"].split()[-1] for r in steps] == ["math", "sdpa"]
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None for r in steps)  # no peak on CPU
    assert [r["config"].split(",")[0].split()[-2:] for r in by_check["generate"]] == [["bf16", "greedy"],
                                                                                      ["beam", "2"]]
    assert all(" bf16 " in r["config"] for r in steps + by_check["generate"])  # the GPU run's dtype, on CPU
    table = result.stdout
    assert table.count(" ok ") == len(rows) and "FAILED" not in table


def test_refuses_cuda_without_a_gpu_and_full_size_on_cpu():
    for args, needle in ((["--device", "cuda"], "has no usable CUDA device"),
                         (["--device", "cpu"], "on CPU run the dry run with --device cpu --tiny"),
                         (["--device", "cpu", "--tiny", "--checks", "train"], "names no known check")):
        result = run(*args)
        err = result.stderr.strip()
        assert result.returncode == 2 and result.stdout == "", (args, result.stdout, err)
        assert err.startswith("gpu_check: error:") and needle in err and "\n" not in err, (args, err)


def test_a_failing_check_is_a_failed_row_and_the_others_still_run():
    result = run("--device", "cpu", "--tiny", "--checks", "step,generate", "--archs", "ofa_nope")
    assert result.returncode == 1, result.stderr[-2000:]
    failed = [line for line in result.stdout.splitlines() if " FAILED " in line]
    assert [line.split()[0] for line in failed] == ["model", "generate"]
    assert all("unknown OFA preset 'ofa_nope'" in line for line in failed)

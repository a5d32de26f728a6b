"""Preemption handling under Slurm: signal -> forwarded to the training command -> checkpoint -> scontrol requeue.

A stand-in training command (checkpoints when signalled) and a stand-in `scontrol` (records its arguments)
replace the real ones; the supervisor process itself is the real one, signalled the way Slurm signals a batch
shell (`#SBATCH --signal=B:USR1@...`)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ofa_scale.parallel.slurm_supervisor import decide

CHILD = textwrap.dedent("""
    import signal, sys, time, pathlib
    out = pathlib.Path(sys.argv[1])
    mode = sys.argv[2]
    def stop(signum, frame):
        (out / "checkpoint").write_text(signal.Signals(signum).name)
        sys.exit(3 if mode == "fail-on-signal" else 0)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    (out / "ready").write_text("1")
    if mode == "finish":
        sys.exit(0)
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(9)
""")


@pytest.fixture
def tools(tmp_path):
    child = tmp_path / "train.py"
    child.write_text(CHILD)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    return tmp_path, child, scontrol


def start(tools, mode, job_id="4242", extra=()):
    tmp, child, scontrol = tools
    env = dict(os.environ)
    env.pop("SLURM_JOB_ID", None)
    if job_id:
        env["SLURM_JOB_ID"] = job_id
    cmd = [sys.executable, "-m", "ofa_scale.parallel.slurm_supervisor", "--scontrol", str(scontrol), *extra,
           "--", sys.executable, str(child), str(tmp), mode]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp / "ready").exists():
        assert time.time() < deadline and proc.poll() is None, "the training stand-in never started"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_is_forwarded_then_the_job_is_requeued(tools, sig):
    tmp = tools[0]
    proc = start(tools, "wait")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp / "checkpoint").read_text() == sig.name  # the command saw the signal and checkpointed
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeued job 4242" in err


def test_a_run_that_ends_on_its_own_is_not_requeued(tools):
    proc = start(tools, "finish")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert not (tools[0] / "scontrol.log").exists()


def test_a_command_failing_after_the_signal_is_not_requeued(tools):
    proc = start(tools, "fail-on-signal")
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert not (tools[0] / "scontrol.log").exists()
    assert "not requeueing a failing job" in err


def test_without_a_slurm_job_nothing_is_requeued(tools):
    proc = start(tools, "wait", job_id=None)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and not (tools[0] / "scontrol.log").exists()
    assert "no SLURM_JOB_ID" in err


def test_decisions():
    assert decide([], 0, True).requeue is False
    assert decide([], 5, True).exit_code == 5
    assert decide(["SIGUSR1"], 0, True).requeue is True
    assert decide(["SIGUSR1"], 0, False).requeue is False
    assert decide(["SIGTERM"], 1, True).requeue is False


def test_missing_command_is_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "ofa_scale.parallel.slurm_supervisor", "--"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "after '--'" in r.stderr


def test_task_wrapper_maps_slurm_variables_to_the_torch_rendezvous():
    from pathlib import Path

    task = Path(__file__).resolve().parents[2] / "slurm" / "task.sh"
    env = dict(os.environ, SLURM_PROCID="11", SLURM_NTASKS="16", SLURM_LOCALID="3", SLURM_NTASKS_PER_NODE="8",
               SLURM_NODEID="1", MASTER_ADDR="node-a", MASTER_PORT="29411")
    out = subprocess.run(["bash", str(task), "env"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    got = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"], got["NODE_RANK"]) == (
        "11", "16", "3", "8", "1")
    env.pop("MASTER_ADDR")
    out = subprocess.run(["bash", str(task), "true"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "set MASTER_ADDR" in out.stderr

"""Preemption handling under Slurm: signal -> SIGUSR1 to the training command -> checkpoint -> scontrol requeue.

A stand-in training command (checkpoints when signalled and writes RUN_DIR/status.json like ofa-train) and a
stand-in `scontrol` (records its arguments, answers `show job` with a restart count) replace the real ones; the
supervisor process itself is the real one, signalled the way Slurm signals a batch shell
(`#SBATCH --signal=B:USR1@...`). tests/slurm/test_real_slurm.py runs the same chain on a real Slurm."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ofa_scale.parallel.slurm_supervisor import decide

CHILD = textwrap.dedent("""
    import json, signal, sys, time, pathlib
    out = pathlib.Path(sys.argv[1])
    mode = sys.argv[2]
    def status(state):
        if mode != "no-status":
            (out / "status.json").write_text(json.dumps({"state": state, "step": 3, "steps": 10}))
    def stop(signum, frame):
        (out / "checkpoint").write_text(signal.Signals(signum).name)
        # a signal during the last step: the run finishes anyway
        status("finished" if mode == "last-step" else "stopped")
        sys.exit(3 if mode == "fail-on-signal" else 0)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    (out / "ready").write_text("1")
    if mode == "finish":
        status("finished")
        sys.exit(0)
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(9)
""")

# `show job -o ID` answers with the restart count in ./restarts (what Slurm raises when it requeues a job itself);
# `requeue ID` fails with the message in ./requeue_error when that file exists
SCONTROL = """#!/bin/sh
echo "$@" >> {tmp}/scontrol.log
case "$1" in
  show) echo "JobId=$4 JobName=ofa-pretrain JobState=RUNNING Restarts=$(cat {tmp}/restarts 2>/dev/null || echo 0)" ;;
  requeue) if [ -f {tmp}/requeue_error ]; then cat {tmp}/requeue_error >&2; exit 1; fi ;;
esac
"""


@pytest.fixture
def tools(tmp_path):
    child = tmp_path / "train.py"
    child.write_text(CHILD)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(SCONTROL.format(tmp=tmp_path))
    scontrol.chmod(0o755)
    scancel = tmp_path / "scancel"
    scancel.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scancel.log'}\n")
    scancel.chmod(0o755)
    return tmp_path, child, scontrol


def start(tools, mode, job_id="4242", extra=(), restart_count=None):
    tmp, child, scontrol = tools
    env = dict(os.environ)
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        env.pop(var, None)
    if job_id:
        env["SLURM_JOB_ID"] = job_id
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    cmd = [sys.executable, "-m", "ofa_scale.parallel.slurm_supervisor", "--scontrol", str(scontrol),
           "--scancel", str(tmp / "scancel"), *extra,
           "--", sys.executable, str(child), str(tmp), mode]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp / "ready").exists():
        assert time.time() < deadline and proc.poll() is None, "the training stand-in never started"
        time.sleep(0.05)
    return proc


def interrupt(tools, mode, sig=signal.SIGUSR1, **kw):
    """Start the supervisor, signal it the way Slurm does, return (exit code, its stderr)."""
    proc = start(tools, mode, **kw)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def requeues(tmp):
    """The `scontrol requeue` calls the supervisor made."""
    log = tmp / "scontrol.log"
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] if log.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_is_forwarded_then_the_job_is_requeued(tools, sig):
    tmp = tools[0]
    rc, err = interrupt(tools, "wait", sig)
    assert rc == 0, err
    # whatever arrived, the command gets SIGUSR1: srun passes it on, while it turns SIGTERM into SIGKILL
    assert (tmp / "checkpoint").read_text() == "SIGUSR1"
    assert requeues(tmp) == ["requeue 4242"]
    assert "requeued job 4242" in err


def test_forward_as_same_forwards_the_signal_received(tools):
    tmp = tools[0]
    rc, err = interrupt(tools, "wait", signal.SIGTERM, extra=("--forward-as", "same"))
    assert rc == 0, err
    assert (tmp / "checkpoint").read_text() == "SIGTERM"


def test_with_a_run_dir_a_stopped_run_is_requeued(tools):
    tmp = tools[0]
    rc, err = interrupt(tools, "wait", extra=("--run-dir", str(tmp)))
    assert rc == 0, err
    assert requeues(tmp) == ["requeue 4242"]


def test_a_signal_during_the_last_step_does_not_requeue_the_finished_run(tools):
    tmp = tools[0]
    rc, err = interrupt(tools, "last-step", extra=("--run-dir", str(tmp)))
    assert rc == 0, err
    assert (tmp / "checkpoint").exists() and requeues(tmp) == []
    assert "not requeueing a finished run" in err
    assert not (tmp / "scancel.log").exists()


def test_a_preemption_during_the_last_step_cancels_slurms_requeue(tools):
    """Slurm requeued the job itself, but the run finished in its last step: the requeued copy is cancelled."""
    tmp = tools[0]
    (tmp / "restarts").write_text("1")
    rc, err = interrupt(tools, "last-step", signal.SIGTERM, extra=("--run-dir", str(tmp)), restart_count=0)
    assert rc == 0, err
    assert requeues(tmp) == [] and (tmp / "scancel.log").read_text().split() == ["4242"]
    assert "cancelled the requeued job" in err


def test_a_status_the_command_did_not_rewrite_does_not_requeue(tools):
    tmp = tools[0]
    # left by an earlier invocation; this one exits 0 after the signal without writing its own
    (tmp / "status.json").write_text(json.dumps({"state": "stopped", "step": 3, "steps": 10}))
    rc, err = interrupt(tools, "no-status", extra=("--run-dir", str(tmp)))
    assert rc == 0, err
    assert requeues(tmp) == [] and "was not rewritten" in err


def test_a_job_slurm_already_requeued_is_reported_as_requeued(tools):
    """Preemption / `scontrol requeue`: Slurm signals the job and requeues it itself, raising its restart count;
    a second requeue would fail ("Job is pending execution") and mark the job as failed."""
    tmp = tools[0]
    (tmp / "restarts").write_text("2")
    (tmp / "requeue_error").write_text("Job is pending execution for job 4242")
    rc, err = interrupt(tools, "wait", signal.SIGTERM, extra=("--run-dir", str(tmp)), restart_count=1)
    assert rc == 0, err
    assert requeues(tmp) == []
    assert "Slurm already requeued job 4242" in err and "--requeue" not in err


def test_a_job_submitted_without_requeue_fails_with_the_fix(tools):
    tmp = tools[0]
    (tmp / "requeue_error").write_text("Requested operation is presently disabled for job 4242")
    rc, err = interrupt(tools, "wait", extra=("--run-dir", str(tmp)), restart_count=0)
    assert rc == 1
    assert requeues(tmp) == ["requeue 4242"]
    assert "presently disabled" in err and "submit the job with --requeue" in err


def test_a_run_that_ends_on_its_own_is_not_requeued(tools):
    proc = start(tools, "finish")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert requeues(tools[0]) == []


def test_a_command_failing_after_the_signal_is_not_requeued(tools):
    rc, err = interrupt(tools, "fail-on-signal")
    assert rc == 3
    assert requeues(tools[0]) == []
    assert "not requeueing a failing job" in err


def test_without_a_slurm_job_nothing_is_requeued(tools):
    rc, err = interrupt(tools, "wait", job_id=None)
    assert rc == 0 and requeues(tools[0]) == []
    assert "no SLURM_JOB_ID" in err


def test_decisions():
    assert decide([], 0, True).requeue is False
    assert decide([], 5, True).exit_code == 5
    assert decide(["SIGUSR1"], 0, True).requeue is True
    assert decide(["SIGUSR1"], 0, False).requeue is False
    assert decide(["SIGTERM"], 1, True).requeue is False
    assert decide(["SIGUSR1"], 0, True, "stopped").requeue is True
    assert decide(["SIGUSR1"], 0, True, "finished").requeue is False
    assert decide(["SIGUSR1"], 0, True, "missing RUN_DIR/status.json").requeue is False
    assert decide([], 0, True, "finished").exit_code == 0


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


def test_a_bad_signal_name_is_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "ofa_scale.parallel.slurm_supervisor", "--forward-as", "SIGFOO", "--",
                        "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--forward-as: 'SIGFOO'" in r.stderr

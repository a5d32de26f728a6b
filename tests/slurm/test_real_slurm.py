"""Preemption on a real Slurm (slurmctld + slurmd + munge on this machine), not a stand-in.

`.ci/run` starts a one-node Slurm with scripts/slurm_local.sh, exports SLURM_CONF and runs `pytest -m slurm`;
`make test` deselects this marker. By hand:

    scripts/slurm_local.sh start /tmp/slurm && export SLURM_CONF=/tmp/slurm/slurm.conf
    .venv/bin/python -m pytest -q -m slurm tests/slurm; scripts/slurm_local.sh stop /tmp/slurm

One job of slurm/pretrain.sbatch (CPU override: 1 node, 1 task, no GPUs), the default loader with a worker
process, is interrupted twice the two ways a cluster does it:
1. `scancel --signal=USR1 --batch JOB`, the signal the sbatch header names (`--signal=B:USR1@...`): the
   supervisor forwards SIGUSR1 through srun, ofa-train checkpoints and exits 0, the supervisor requeues the job;
2. `scontrol requeue JOB`, what a preemption does: Slurm sends SIGTERM to every process of the job (the trainer,
   its DataLoader worker, srun, the supervisor) and requeues the job itself; the supervisor forwards SIGUSR1
   (srun turns SIGTERM into SIGKILL) and reports Slurm's requeue as the requeue.
The job must come back twice, resume from its checkpoints in the same mlflow run, finish (COMPLETED, status.json
"finished") and log exactly the losses of an uninterrupted plain `python -m ofa_scale.train` run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.conftest import REPO, free_port, read_metrics, tiny_config, write_config

pytestmark = pytest.mark.slurm
# generous waits: each trainer start imports DeepSpeed and builds the model; on a shared 2-core machine under
# heavy load that alone has taken minutes (on an idle one the whole test takes about two)
WAIT_S = 900

STEPS = 40
# the CPU override of the sbatch header's GPU layout
CPU_ONLY = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]


def slurm(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def job_info(job: str) -> dict[str, str]:
    out = slurm("scontrol", "show", "job", "-o", job).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


@pytest.fixture(scope="module")
def cluster():
    conf = os.environ.get("SLURM_CONF")
    if not conf or not Path(conf).is_file():
        pytest.fail("no Slurm to test on: run `scripts/slurm_local.sh start DIR` and export "
                    "SLURM_CONF=DIR/slurm.conf (.ci/run does both)")
    states = slurm("sinfo", "-h", "-o", "%T").stdout.split()
    assert states and all(s.startswith(("idle", "mixed")) for s in states), f"Slurm nodes not ready: {states}"
    return conf


def wait_for(what: str, check, timeout: float, job: str, out: Path):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            info = job_info(job)
            raise AssertionError(f"timed out waiting for {what}; job {job} is {info.get('JobState')} "
                                 f"(restarts {info.get('Restarts')}); job output:\n"
                                 f"{out.read_text()[-6000:] if out.exists() else '(none)'}")
        time.sleep(0.5)


def steps_logged(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.timeout(4 * WAIT_S)
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(cluster, tiny_data, tmp_path):
    # the default loader keeps a worker process: the signals reach it too (the whole step's process group)
    cfg = tiny_config(tiny_data, train={"steps": STEPS, "ckpt_interval": 1000})
    cfg["data"]["num_workers"] = 1
    config = write_config(tmp_path / "tiny.yaml", cfg)
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = {**os.environ, "CONFIG": str(config), "RUN_DIR": str(run_dir), "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = subprocess.run(["sbatch", "--parsable", *CPU_ONLY, f"--output={out}", "slurm/pretrain.sbatch"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    job = job.stdout.strip().split(";")[0]
    # while the job trains: the reference run, uninterrupted and without Slurm
    reference = tmp_path / "reference"
    plain = subprocess.Popen([sys.executable, "-m", "ofa_scale.train", "--config", str(config), "--run-dir",
                              str(reference)], cwd=REPO, env={**env, "MASTER_PORT": str(free_port())},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # 1. the signal the sbatch header names, delivered by hand
        wait_for("3 logged steps", lambda: steps_logged(run_dir) >= 3, WAIT_S, job, out)
        slurm("scancel", "--signal=USR1", "--batch", job)
        wait_for("the first requeue", lambda: f"job {job} restart 1" in out.read_text(), WAIT_S, job, out)
        first_stop = json.loads((run_dir / "status.json").read_text())
        assert first_stop["state"] == "stopped" and 3 <= first_stop["step"] < STEPS, first_stop

        # 2. a preemption: Slurm signals every process and requeues the job itself
        wait_for("3 more steps", lambda: steps_logged(run_dir) >= first_stop["step"] + 3, WAIT_S,
                 job, out)
        slurm("scontrol", "requeue", job)
        wait_for("the job to finish", lambda: job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                 WAIT_S, job, out)
        plain_log, _ = plain.communicate(timeout=WAIT_S)
        assert plain.returncode == 0, plain_log[-6000:]
    finally:
        slurm("scancel", job, check=False)
        if plain.poll() is None:
            plain.kill()
            plain.wait()

    log = out.read_text()
    info = job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert info["Restarts"] == "2", log[-6000:]
    assert [f"job {job} restart {n}:" in log for n in range(3)] == [True] * 3
    assert f"slurm-supervisor: requeued job {job}" in log  # after the USR1: the supervisor's requeue
    assert f"slurm-supervisor: Slurm already requeued job {job}" in log  # after the preemption: Slurm's
    assert f"scontrol requeue {job} failed" not in log, log[-6000:]
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "finished", "step": STEPS, "steps": STEPS}

    # three invocations, three checkpoints (two stops and the end), one mlflow run
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").glob("step_*/trainer.json"))]
    stops = [r["step"] for r in records]
    assert len(stops) == 3 and stops[0] == first_stop["step"] and stops[-1] == STEPS, stops
    assert len({r["mlflow_run_id"] for r in records}) == 1 and records[0]["mlflow_run_id"]
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        runs = db.execute("select run_uuid, status from runs").fetchall()
        steps = [s for (s,) in db.execute("select step from metrics where key='loss' order by step")]
    assert runs == [(records[0]["mlflow_run_id"], "FINISHED")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))

    # the resumed losses are the uninterrupted run's (fp32 on CPU: bit-identical)
    got, ref = read_metrics(run_dir), read_metrics(reference)
    assert [m["step"] for m in got] == [m["step"] for m in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["loss"] == a["loss"], (a["step"], a["loss"], b["loss"])

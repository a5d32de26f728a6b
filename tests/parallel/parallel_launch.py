"""Launch multi-process scenarios of tests/parallel/parallel_workers.py the way torchrun does (env:// rendezvous, gloo),
and the layouts the equivalence tests compare."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import zygote

WORKER = Path(__file__).with_name("parallel_workers.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out_dir: Path, timeout: float = 300, **params) -> list[dict]:
    """Run `scenario` on `world` processes; return each rank's JSON result (rank order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
        args = [str(WORKER), scenario, str(out_dir), json.dumps(params)]
        log = open(out_dir / f"rank{rank}.log", "w")
        if zygote.usable(env):  # forked from a server that has torch/DeepSpeed/megatron imported already
            procs.append((zygote.ZygoteProcess(args, env, out_dir / f"rank{rank}.log"), log))
        else:
            procs.append((subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(rank)
    if failed:
        tail = (out_dir / f"rank{failed[0]}.log").read_text()[-4000:]
        pytest.fail(f"scenario {scenario} failed on ranks {failed}:\n{tail}")
    return [json.loads((out_dir / f"result{r}.json").read_text()) for r in range(world)]


# The layouts of issue 5 §4, trained 10 steps each from the same canonical initial weights, plus the
# cross-layout resumes of §5 (from the per-rank layout-free checkpoints of issue 8 §4). Shared by
# test_equivalence.py and test_planner.py (launched once per session:
# a 4-process run of even a tiny OFA takes ~40 s on 2 cores).
LAYOUTS = {
    "ref": dict(world=1, save_at=5, export=True),
    "tp2": dict(world=2, tp=2, ckpt=True),
    "pp2": dict(world=2, pp=2, partition="parameters"),
    "tp2pp2": dict(world=4, tp=2, pp=2, ckpt=True, save_at=5, export=True),
    "tp2dp2z3": dict(world=4, tp=2, zero=3, save_at=5),
    "dp2z3": dict(world=2, zero=3, partition_all=True),  # every parameter partitioned: the model is ZeRO-3-clean
    "pp2dp2z1": dict(world=4, pp=2, zero=1, partition="explicit", stage_layers=[5, 2]),  # decoder-side cut
}
RESUMES = {  # name: (checkpoint of run, layout)
    "tp2pp2->tp1": ("tp2pp2", dict(world=1)),
    "tp1->tp2pp2": ("ref", dict(world=4, tp=2, pp=2)),
    "tp2dp2z3->tp1": ("tp2dp2z3", dict(world=1)),  # ZeRO-3 partitions over dp=2 (and tp=2) into one process
}
STEPS = 10
SAVE_AT = 5

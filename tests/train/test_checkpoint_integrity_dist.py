"""Checkpoint integrity across processes: the manifest two ranks hash together equals the one a single process
computes for the same files, and both ranks agree on the fallback when one rank's file is damaged."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ofa_scale.training.checkpoint_integrity import MANIFEST, write_manifest
from tests.train.conftest import free_port

WORKER = Path(__file__).with_name("checkpoint_worker.py")


@pytest.mark.slow
def test_two_ranks_hash_the_same_manifest_and_agree_on_the_fallback(tmp_path):
    ckpt, out = tmp_path / "checkpoints", tmp_path / "out"
    out.mkdir()
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(out)],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert [json.loads((out / f"result{r}.json").read_text())["tag"] for r in range(2)] == ["step_000001"] * 2
    # exactly one warning line, from rank 0 only
    assert "skipping damaged checkpoint step_000002 (zero_pp_rank_1_mp_rank_00_optim_states.pt does not match" \
        in logs[0]
    assert "skipping" not in logs[1]
    # equivalence: one process hashing the same step directory writes the same manifest
    two_ranks = json.loads((ckpt / "step_000001" / MANIFEST).read_text())
    assert {"rank_00000.pt", "rank_00001.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "trainer.json"} == set(two_ranks["files"])
    copy = tmp_path / "copy"
    shutil.copytree(ckpt / "step_000001", copy)
    (copy / MANIFEST).unlink()
    write_manifest(copy)
    assert json.loads((copy / MANIFEST).read_text()) == two_ranks

"""The `latest` pointer moves only after a checkpoint is complete; old ones are pruned; bad states are refused.

The engine here is a small recorder that writes one file per save the way DeepSpeed does (into
`<dir>/<tag>/`); the real DeepSpeed save/load round trip is covered by the resume test in test_train_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ofa_scale.errors import UserError
from ofa_scale.training.checkpoint import (find_latest, load_rank_state, rng_state, save_checkpoint,
                                           set_rng_state)


class FileWritingEngine:
    def __init__(self, fail_at=None):
        self.fail_at = fail_at

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        assert save_latest is False  # the pointer is ours, written last
        if tag == self.fail_at:
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
            raise RuntimeError("node lost mid-save")
        path = Path(save_dir) / tag / "mp_rank_00_model_states.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")


def test_pointer_moves_only_after_a_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(FileWritingEngine(), ckpt, 100, 0, {"rng": rng_state()}, {"mlflow_run_id": "abc"}, keep=3)
    point = find_latest(ckpt)
    assert point.tag == "step_000100" and point.step == 100 and point.mlflow_run_id == "abc"
    with pytest.raises(RuntimeError, match="mid-save"):
        save_checkpoint(FileWritingEngine(fail_at="step_000200"), ckpt, 200, 0, {}, {}, keep=3)
    assert find_latest(ckpt).tag == "step_000100"  # the half-written step_000200 is never pointed at
    # the retry of the same step replaces the leftover and then moves the pointer
    save_checkpoint(FileWritingEngine(), ckpt, 200, 0, {"rng": rng_state()}, {}, keep=3)
    assert find_latest(ckpt).tag == "step_000200"


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(FileWritingEngine(), ckpt, step, 0, {}, {}, keep=2)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000003", "step_000004"]
    for step in (5, 6):
        save_checkpoint(FileWritingEngine(), ckpt, step, 0, {}, {}, keep=0)  # 0 keeps all
    assert len(list(ckpt.glob("step_*"))) == 4


def test_rank_state_restores_rng_exactly(tmp_path):
    import random

    import numpy as np
    import torch

    ckpt = tmp_path / "checkpoints"
    save_checkpoint(FileWritingEngine(), ckpt, 1, 0, {"rng": rng_state()}, {"world_size": 1}, keep=0)
    expected = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(load_rank_state(find_latest(ckpt), 0)["rng"])
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
    with pytest.raises(UserError, match="written by 1 processes; resume with the same number"):
        load_rank_state(find_latest(ckpt), 1)


def test_unreadable_states_are_refused_with_the_fix(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert find_latest(ckpt) is None
    save_checkpoint(FileWritingEngine(), ckpt, 1, 0, {}, {}, keep=0)
    record = ckpt / "step_000001" / "trainer.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(UserError, match="format_version 99"):
        find_latest(ckpt)
    record.unlink()
    with pytest.raises(UserError, match="trainer.json is missing"):
        find_latest(ckpt)

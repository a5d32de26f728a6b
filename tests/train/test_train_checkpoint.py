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


# ---- integrity: per-file sha256 in the checkpoint's manifest, checked before a resume loads anything ---------
def _save_steps(ckpt: Path, steps, keep=0, **record) -> None:
    for step in steps:
        save_checkpoint(FileWritingEngine(), ckpt, step, 0, {"rng": rng_state()}, {"world_size": 1, **record},
                        keep=keep)


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    import hashlib

    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1])
    tag_dir = ckpt / "step_000001"
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    on_disk = sorted(p.name for p in tag_dir.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk == ["mp_rank_00_model_states.pt", "rank_00000.pt", "trainer.json"]
    for name, entry in manifest["files"].items():
        data = (tag_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one_with_one_warning(tmp_path, capsys):
    from ofa_scale.training.checkpoint import choose_resume_point

    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1, 2, 3])
    _flip_a_bit(ckpt / "step_000003" / "mp_rank_00_model_states.pt")  # same size, other bytes
    rank_file = ckpt / "step_000002" / "rank_00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:100])  # truncated
    capsys.readouterr()
    point = choose_resume_point(ckpt)
    assert point.tag == "step_000001" and point.step == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "step_000003 (mp_rank_00_model_states.pt does not match its sha256)" in err[0]
    assert "step_000002 (rank_00000.pt has 100 bytes" in err[0] and "resuming from step_000001" in err[0]
    # the fallback point is usable: its rank state loads
    assert "rng" in load_rank_state(point, 0)


def test_no_intact_checkpoint_is_one_sentence(tmp_path):
    from ofa_scale.training.checkpoint import choose_resume_point

    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1, 2])
    (ckpt / "step_000002" / "rank_00000.pt").unlink()
    _flip_a_bit(ckpt / "step_000001" / "manifest.json")
    with pytest.raises(UserError, match=r"holds no intact checkpoint to resume from \(step_000002 \(rank_00000.pt "
                                        r"is missing\); step_000001 \(.*\)\); restore the files"):
        choose_resume_point(ckpt)


def test_another_releases_checkpoint_is_refused_not_skipped(tmp_path):
    from ofa_scale.training.checkpoint import choose_resume_point
    from ofa_scale.training.checkpoint_integrity import write_manifest

    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1, 2])
    record = ckpt / "step_000002" / "trainer.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "format_version": 99}))
    write_manifest(ckpt / "step_000002")  # intact files, written by another release
    with pytest.raises(UserError, match="format_version 99; .* resume it with the release that wrote it"):
        choose_resume_point(ckpt)


def test_a_damaged_trainer_record_is_skipped_by_the_early_choice_too(tmp_path):
    from ofa_scale.training.run_dir import open_run_dir

    run_root = tmp_path / "run"
    _save_steps(run_root / "checkpoints", [1, 2])
    (run_root / "checkpoints" / "step_000002" / "trainer.json").write_text("{\"step\": 2, trunc")
    _, point = open_run_dir(run_root, resume=True)
    assert point.tag == "step_000001"


def test_checkpoints_without_a_manifest_are_not_resumed_silently(tmp_path):
    from ofa_scale.training.run_dir import open_run_dir

    run_root = tmp_path / "run"
    _save_steps(run_root / "checkpoints", [1])
    (run_root / "checkpoints" / "step_000001" / "manifest.json").unlink()  # e.g. written before manifests existed
    with pytest.raises(UserError, match="holds no intact checkpoint"):
        open_run_dir(run_root, resume=True)
    with pytest.raises(UserError, match="already holds a run"):
        open_run_dir(run_root, resume=False)


def test_non_finite_checkpoints_are_never_published_and_never_cost_the_last_finite_one(tmp_path):
    from ofa_scale.training.checkpoint import choose_resume_point

    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1, 2], keep=1)
    _save_steps(ckpt, [3, 4, 5], keep=1, finite=False)  # a long divergence
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000002", "step_000005"]
    assert (ckpt / "latest").read_text() == "step_000002"
    assert choose_resume_point(ckpt).tag == "step_000002"
    _save_steps(ckpt, [6], keep=1)  # finite again: the pointer moves and the old ones go
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000006"]
    assert choose_resume_point(ckpt).tag == "step_000006"


# ---- the run directory: one trainer at a time; a file is not a run directory ---------------------------------
def test_a_second_trainer_on_the_same_run_dir_is_refused_until_the_first_dies(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from ofa_scale.training.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from ofa_scale.training.run_dir import RunDir; lock = RunDir(Path(sys.argv[1])).lock(); "
         "print('locked', flush=True); time.sleep(600)", str(run.root)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"is in use by another ofa-train \(pid {holder.pid} on .*\); wait"):
            run.lock()
        os.kill(holder.pid, signal.SIGKILL)  # a crash releases the lock: no stale lock file to clean up
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with run.lock():
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            run.lock()  # the same process twice (e.g. two train() calls) is refused too
    run.lock().release()  # released by the `with`


def test_a_run_dir_that_is_a_file_is_refused_in_one_sentence(tmp_path):
    from ofa_scale.training.run_dir import RunDir, open_run_dir

    path = tmp_path / "run"
    path.write_text("not a directory")
    for resume in (False, True):
        with pytest.raises(UserError, match="is a file, not a directory; pass a run directory"):
            open_run_dir(path, resume=resume)
    with pytest.raises(UserError, match="is a file, not a directory"):
        RunDir(path).lock()


def test_disk_full_while_checkpointing_is_one_sentence_and_keeps_latest(tmp_path):
    """ENOSPC in the middle of a save: a UserError naming the fix, the unfinished step removed, `latest` intact."""
    import errno

    from ofa_scale.errors import UserError
    from ofa_scale.training.checkpoint import LATEST, save_checkpoint

    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_000002").mkdir(parents=True)
    (ckpt / LATEST).write_text("step_000002")

    class FullDisk:
        def save_checkpoint(self, directory, tag, save_latest):
            (ckpt / tag).mkdir(parents=True, exist_ok=True)
            (ckpt / tag / "half_written.pt").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="is full .* while writing checkpoint step_000004.*still points at "
                                        "step_000002.*--resume"):
        save_checkpoint(FullDisk(), ckpt, 4, 0, {"rng": None}, {"finite": True}, keep=3)
    assert (ckpt / LATEST).read_text() == "step_000002"
    assert not (ckpt / "step_000004").exists()

"""`ofa-train` on a finetuning config (one process, the engine tests' fake task): updates from epochs, validation
logged as valid/<metric>, the best pointer (moves only on improvement, never pruned), EMA, and a mid-epoch resume
that continues exactly like the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from tests.finetune.engine_data import caption_shards, finetune_config, launch, read_metrics, write_config

pytestmark = pytest.mark.timeout(600)

# 12 training rows, global batch 4: 3 updates per epoch, 2 epochs; validation every 2 updates and at epoch ends
SETTINGS = dict(task={"valid_interval": 2}, train={"epochs": 2, "global_batch_size": 4, "micro_batch_size": 2,
                                                   "ckpt_interval": 1, "keep_checkpoints": 1, "ema_decay": 0.9})
SCORES = "0.5,0.2,0.6,0.1"  # the main metric at the validations of steps 2, 3, 4, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_run")
    return {"train": caption_shards(root, "train", 12), "valid": caption_shards(root, "valid", 5, skip=(3,)),
            "root": root}


@pytest.fixture(scope="module")
def uninterrupted(data):
    config = write_config(data["root"] / "ft.yaml", finetune_config(data["train"], data["valid"], **SETTINGS))
    run = data["root"] / "whole"
    launch("train", "--config", str(config), "--run-dir", str(run), env={"FAKE_SCORES": SCORES})
    return run


def test_validation_is_logged_and_the_best_pointer_moves_only_on_improvement(uninterrupted):
    metrics = read_metrics(uninterrupted)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # epochs x (12 // 4), no train.steps
    valid = {m["step"]: m["valid/match"] for m in metrics if "valid/match" in m}
    assert valid == {2: 0.5, 3: 0.2, 4: 0.6, 6: 0.1}
    assert all("valid/length" in m and "valid/first" in m for m in metrics if "valid/match" in m)
    assert all(m["loss/caption"] > 0 for m in metrics)
    ckpt = uninterrupted / "checkpoints"
    assert (ckpt / "best").read_text().strip() == "step_000004"
    assert json.loads((uninterrupted / "best.json").read_text()) == {
        "format_version": 1, "tag": "step_000004", "step": 4, "metric": "match", "value": 0.6}
    # keep_checkpoints=1 pruned every other step, but never the best one
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000004", "step_000006"]
    assert (ckpt / "latest").read_text().strip() == "step_000006"
    # checkpoints hold the EMA: per rank, and the layout-free copy ofa-eval reads
    assert (ckpt / "step_000004" / "ema" / "index.json").is_file()
    import torch

    rank_state = torch.load(ckpt / "step_000006" / "rank_00000.pt", weights_only=False)
    assert rank_state["ema"]["updates"] == 6 and rank_state["ema"]["decay"] == 0.9
    status = json.loads((uninterrupted / "status.json").read_text())
    assert status == {"state": "finished", "step": 6, "steps": 6}


def test_a_mid_epoch_resume_continues_exactly(uninterrupted, data):
    config = write_config(data["root"] / "ft_resume.yaml",
                          finetune_config(data["train"], data["valid"], **SETTINGS))
    run = data["root"] / "resumed"
    env = {"FAKE_SCORES": SCORES}
    launch("train", "--config", str(config), "--run-dir", str(run), "--stop-after", "2", env=env)
    assert [m["step"] for m in read_metrics(run)] == [1, 2]  # stopped inside the first epoch (3 updates)
    launch("train", "--config", str(config), "--run-dir", str(run), "--resume", env=env)
    whole, resumed = read_metrics(uninterrupted), read_metrics(run)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, resumed):
        # same data order (loader state), weights, optimizer and RNG: the same numbers
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
        # validation on the EMA weights: the EMA state came back too
        if "valid/first" in a:
            assert b["valid/first"] == pytest.approx(a["valid/first"]) and b["valid/length"] == a["valid/length"]


def test_scst_starts_from_a_run_directorys_best_ema_weights(uninterrupted, data):
    """Caption stage 2 after stage 1: model.pretrained is the stage-1 run (its best checkpoint's EMA weights), the
    update is the SCST step (the real caption task: references ride through the Collator, document frequencies
    come from data.train when task.cider_df is empty)."""
    import subprocess
    import sys

    import torch

    from ofa_scale.finetune.weights import load_run_model, run_checkpoint
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader
    from tests.finetune.engine_data import REPO

    best = run_checkpoint(uninterrupted)
    assert best == uninterrupted / "checkpoints" / "step_000004"
    model = load_run_model(uninterrupted)
    ema = CanonicalReader(best / "ema").view(MODEL)
    live = CanonicalReader(best / "canonical").view(MODEL)
    name = "decoder.layers.0.fc1.weight"
    assert torch.equal(model.state_dict()[name], ema.read(name)) and not torch.equal(ema.read(name), live.read(name))

    cfg = finetune_config(data["train"], data["valid"], model={"pretrained": str(uninterrupted)},
                          task={"criterion": "scst", "max_tgt_length": 5, "scst": {"beam": 3, "max_len_b": 5}},
                          train={"epochs": 1, "steps": 2, "global_batch_size": 4, "micro_batch_size": 2})
    config = write_config(data["root"] / "scst.yaml", cfg)
    run = data["root"] / "scst"
    proc = subprocess.run([sys.executable, "-m", "ofa_scale.train", "--config", str(config), "--run-dir", str(run)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["scst/hypotheses"] == 4 * 3 for m in metrics)  # every image of the global batch, beam 3
    assert all("valid/cider" in m for m in metrics[-1:])

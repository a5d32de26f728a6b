"""A 2-rank ZeRO-3 finetune, and a tp=2 one, equal the single-process one: per-step losses within fp32 tolerance, and validation
with generation — whose ranks decode different numbers of steps (the fake task forces it) — finishes without
hanging and gives rank 0 the single process's metrics; `ofa-eval run` under torchrun gathers the same results.

The ResNet is frozen (train.freeze_resnet): train-mode BatchNorm statistics depend on which rows a rank saw, so a
data-parallel run's running statistics (and everything validated with them) legitimately differ from one
process's otherwise.
"""

from __future__ import annotations

import json

import pytest

from tests.finetune.engine_data import caption_shards, finetune_config, launch, read_metrics, write_config

pytestmark = pytest.mark.timeout(900)

SETTINGS = dict(train={"epochs": 2, "global_batch_size": 4, "micro_batch_size": 2, "ckpt_interval": 100,
                       "ema_decay": 0.9, "freeze_resnet": True},
                parallel={"zero_stage": 3})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_parallel")
    train, valid = caption_shards(root, "train", 12), caption_shards(root, "valid", 5, skip=(3,))
    config = write_config(root / "ft.yaml", finetune_config(train, valid, **SETTINGS))
    out = {"config": config, "valid": valid}
    for nproc in (1, 2):
        out[nproc] = root / f"run{nproc}"
        launch("train", "--config", str(config), "--run-dir", str(out[nproc]), nproc=nproc, timeout=600)
    # tensor parallel: the same data on both ranks, each holding half of every split matrix and the EMA of its half
    out["tp2"] = root / "run_tp2"
    launch("train", "--config", str(config), "--run-dir", str(out["tp2"]), "--set", "parallel.tp=2", "--set",
           "parallel.zero_stage=1", nproc=2, timeout=600)
    return out


def test_two_rank_zero3_finetune_and_validation_equal_one_process(runs):
    one, two = read_metrics(runs[1]), read_metrics(runs[2])
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["loss/caption"] == pytest.approx(a["loss/caption"], rel=1e-4), a["step"]
    valid_steps = [m["step"] for m in one if "valid/match" in m]
    assert valid_steps == [3, 6]  # epoch ends (valid_interval 0)
    for a, b in zip(one, two):
        for key in ("valid/match", "valid/length", "valid/first"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    # the odd image ids decode 3 more steps than the even ones: both lengths were really generated
    assert one[-1]["valid/length"] == pytest.approx((6 * 3 + 9) / 4)


def test_tensor_parallel_finetune_with_ema_and_validation_equals_one_process(runs):
    """tp=2: per-step losses, and validation (generation in lockstep, on the EMA weights each rank keeps for its
    shard) equal the single process's."""
    one, tp2 = read_metrics(runs[1]), read_metrics(runs["tp2"])
    assert [m["step"] for m in tp2] == [m["step"] for m in one]
    for a, b in zip(one, tp2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        for key in ("valid/match", "valid/length", "valid/first"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    assert sum("valid/first" in m for m in tp2) == 2


def test_ofa_eval_run_on_two_ranks_gathers_what_one_process_finds(runs, tmp_path):
    out = {}
    for nproc in (1, 2):
        out[nproc] = tmp_path / f"eval{nproc}"
        launch("eval", "run", "--config", str(runs["config"]), "--checkpoint", str(runs[1]), "--data",
               str(runs["valid"]), "--out", str(out[nproc]), nproc=nproc)
    m1, m2 = (json.loads((out[n] / "metrics.json").read_text()) for n in (1, 2))
    assert m1["checkpoint"]["weights"] == "ema" and m1["samples"] == m2["samples"] == 4
    for key in ("match", "length", "first", "final"):
        assert m2[key] == m1[key]
    r1, r2 = (json.loads((out[n] / "results.json").read_text()) for n in (1, 2))
    assert r1 == r2 and [r["image_id"] for r in r1] == [100, 101, 102, 104]
    assert (out[1] / "row.md").read_text().startswith("| ft |")


def test_a_two_rank_run_resumes_on_one_process_with_its_ema(runs, tmp_path):
    """Another layout resumes from the layout-free copies, the EMA from `<tag>/ema/`: one more epoch after the
    2-rank run continues like one more epoch after the 1-process run (which resumes its own per-rank files)."""
    import shutil

    more = {}
    for nproc in (1, 2):
        run = tmp_path / f"more{nproc}"
        shutil.copytree(runs[nproc], run)
        launch("train", "--config", str(runs["config"]), "--run-dir", str(run), "--resume", "--set", "train.epochs=3",
               timeout=600)
        more[nproc] = [m for m in read_metrics(run) if m["step"] > 6]
    assert [m["step"] for m in more[2]] == [m["step"] for m in more[1]] == [7, 8, 9]
    for a, b in zip(more[1], more[2]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    assert more[2][-1]["valid/first"] == pytest.approx(more[1][-1]["valid/first"], rel=1e-6)

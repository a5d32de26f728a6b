"""scripts/glue_grid.py (issue 11 §3): a 2×1 grid over a GLUE recipe with a few updates per point; each point is an
ordinary ofa-train run (its own run dir and best.json) tracked in one mlflow store, and the table lists both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.arch=ofa_tiny", "model.overrides.d_model=32", "model.overrides.ffn_dim=64", "model.overrides.heads=2",
        "model.overrides.encoder_layers=1", "model.overrides.decoder_layers=1", "model.pretrained=null",
        "data.tokenizer.kind=sentencepiece", "objectives.num_bins=2", "precision=fp32", "data.num_workers=0",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.steps=2", "task.valid_limit=8",
        "task.max_src_length=12", "task.extra.source_length=40", "logging.mlflow=true"]


@pytest.mark.slow  # two ofa-train runs and an mlflow store: ~40 s of CPU, minutes of wall time on a shared machine
def test_a_two_point_grid_writes_one_table_and_two_mlflow_runs(tmp_path):
    from ofa_scale.cli.preprocess import main as preprocess
    from ofa_scale.data.sample_text_tasks import write_text_corpus
    from ofa_scale.finetune.glue import TEMPLATES

    tsv = write_text_corpus(tmp_path / "tsv", rows=32, eval_rows=8, seed=0)
    for split in ("train", "val"):
        assert preprocess(["shards", "--format", "glue_sst2", "--input", str(tsv[f"glue_sst2_{split}.tsv"]),
                           "--out", str(tmp_path / split), "--no-progress"]) == 0
    text = tmp_path / "text.txt"
    text.write_text("\n".join([r.split("\t")[0] for r in tsv["glue_sst2_train.tsv"].read_text().splitlines()]
                              + [TEMPLATES["glue_sst2"][0], "positive", "negative"] * 20) + "\n")
    assert preprocess(["train-tokenizer", "--input", f"lines:{text}", "--vocab-size", "300", "--soft-vocab-limit",
                       "--model-type", "bpe", "--num-codes", "0", "--num-bins", "2", "--out",
                       str(tmp_path / "tok")]) == 0
    out = tmp_path / "grid"
    sets = [*TINY, f"data.tokenizer.path={tmp_path / 'tok'}", f"data.train={tmp_path / 'train'}",
            f"data.valid={tmp_path / 'val'}"]
    cmd = [sys.executable, str(REPO / "scripts" / "glue_grid.py"), "--config",
           str(REPO / "configs" / "finetune" / "glue_sst2_large.yaml"), "--out", str(out), "--epochs", "1,2",
           "--lr", "1e-3", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    grid = json.loads((out / "grid.json").read_text())
    assert [(p["epochs"], p["lr"], p["tag"]) for p in grid["points"]] == [(1, 1e-3, "e1_lr0.001"),
                                                                          (2, 1e-3, "e2_lr0.001")]
    for p in grid["points"]:
        best = json.loads((Path(p["run_dir"]) / "best.json").read_text())
        assert (p["metric"], p["value"], p["step"]) == ("accuracy", best["value"], best["step"])
        assert 0.0 <= p["value"] <= 1.0
    table = (out / "grid.md").read_text().splitlines()
    assert table[0].startswith("| epochs | lr | global batch | accuracy |") and len(table) == 4
    assert sum("**best**" in row for row in table) == 1

    import mlflow

    client = mlflow.tracking.MlflowClient(grid["tracking_uri"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sorted(r.info.run_name for r in runs) == ["grid/e1_lr0.001", "grid/e2_lr0.001"]
    assert all(r.data.params.get("optim.lr") in (None, "0.001") for r in runs)

    # a second call keeps the finished points instead of training them again
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"})
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 2

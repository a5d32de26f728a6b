"""End to end (issue 13 §2, §4): `ofa-preprocess sample`'s rendered Chinese text lines → `ofa-preprocess shards
--format ocr` → a short finetune with configs/finetune/ocr_base.yaml through the real trainer (`ofa-train`, one
process, the Encouraging Loss switched on) → `ofa-eval run` on the held-out split: text predictions, results.json
in OFA's {"image_id", "ocr"} form and the accuracy / NED metrics; then `ofa-predict --task ocr` on the same lines.

Run twice: with OFA's ResNet stem, and with OFA-OCR's ViT-B/16 stem (`model.overrides.image_stem: vit_b16`, spec-ext
§10.2.4; the stem keeps its fixed ViT-B/16 shape, 64.5 M parameters, which at 64 px is a 4×4 patch grid), whose
weights must have moved and be what the evaluation ran.

Shrunk to this machine as tests/finetune/test_recipes_e2e.py does (a tiny model from scratch, small images, a
few updates) with the sample's own small BERT vocabulary (ocr_vocab/vocab.txt). A few updates teach a tiny
model nothing about reading, so this checks that the pipeline runs and reports, not the accuracy."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from test_recipes_e2e import TRAIN as RECIPE_TRAIN
from test_recipes_e2e import _run, _sets  # its subprocess runner and --set expansion

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # ~30 s of CPU, but 4 process starts

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "finetune" / "ocr_base.yaml")

MODEL = ["model.arch=ofa_tiny", "model.overrides.d_model=64", "model.overrides.ffn_dim=128",
         "model.overrides.heads=2", "model.overrides.encoder_layers=1", "model.overrides.decoder_layers=1",
         "data.tokenizer.path={data}/corpus/finetune/ocr_vocab", "task.image_size=64", "precision=fp32",
         "objectives.num_bins=8", "task.decoding.max_len_b=10", "task.decoding.beam=2",
         "task.decoding.batch_size=8"]
# the recipe e2e test's training overrides (from scratch, batch 8, lr 2e-3, no mlflow), then this test's: 6 updates,
# the Encouraging Loss, validation on 8 lines (later --set values win)
TRAIN = [*RECIPE_TRAIN, "train.log_interval=2", "task.valid_limit=8", "schedule.warmup_ratio=0.1", "train.epochs=1",
         "train.steps=6", "objectives.loss=encouraging", "objectives.log_end=0.75"]


@pytest.mark.parametrize("stem", ["resnet", "vit_b16"])
def test_ocr_finetune_and_evaluation_on_rendered_lines(tmp_path, stem):
    from test_ocr_task import cjk_font_or_skip

    cjk_font_or_skip()
    model = [*MODEL, f"model.overrides.image_stem={stem}"]
    py, data, log = sys.executable, tmp_path, tmp_path / "run.log"
    _run([py, "-m", "ofa_scale.cli.preprocess", "sample", "--out", str(data / "corpus"), "--rows", "1",
          "--finetune-images", "48", "--finetune-eval-images", "8"], log)
    tsv = data / "corpus" / "finetune"
    for split in ("train", "test"):
        _run([py, "-m", "ofa_scale.cli.preprocess", "shards", "--format", "ocr", "--input",
              str(tsv / f"ocr_{split}.tsv"), "--out", str(data / split), "--no-progress"], log)
    run = data / "run"
    _run([py, "-m", "ofa_scale.train", "--config", CONFIG, "--run-dir", str(run), *_sets(model + TRAIN, data),
          "--set", f"data.train={data / 'train'}", "--set", f"data.valid={data / 'test'}"], log)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any("valid/accuracy" in r for r in records) and any("valid/ned" in r for r in records)
    if stem == "vit_b16":
        _assert_vit_stem_trained(run)

    out = data / "eval"
    _run([py, "-m", "ofa_scale.cli.evaluate", "run", "--config", CONFIG, "--checkpoint", str(run), "--data",
          str(data / "test"), "--out", str(out), *_sets(model, data)], log)
    results = json.loads((out / "results.json").read_text())
    test_ids = [int(r.split("\t")[0]) for r in (tsv / "ocr_test.tsv").read_text().splitlines()]
    assert sorted(r["image_id"] for r in results) == sorted(test_ids)
    assert all(isinstance(r["ocr"], str) and " " not in r["ocr"] for r in results)
    assert any(r["ocr"] for r in results)  # the model writes text, not only end-of-sequence
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["ned"] <= 1.0

    # ofa-predict (and so ofa-demo's OCR tab) reads the same TSV with the run's own task section
    pred = data / "pred.jsonl"
    _run([py, "-m", "ofa_scale.predict.cli", "--model", str(run), "--task", "ocr", "--input",
          str(tsv / "ocr_test.tsv"), "--out", str(pred), "--device", "cpu"], log)
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(lines) == len(test_ids) and all(isinstance(x["text"], str) and "error" not in x for x in lines)
    by_id = {r["image_id"]: r["ocr"] for r in results}
    assert all(by_id[int(x["id"])] == x["text"] for x in lines)  # the same decoding as ofa-eval run


def _assert_vit_stem_trained(run: Path) -> None:
    """The run's model has OFA-OCR's ViT stem (its 112 tensors under encoder.embed_images), and training moved it."""
    import torch

    from ofa_scale.finetune.weights import run_checkpoint
    from ofa_scale.model.init import InitialWeights
    from ofa_scale.parallel.canonical_store import MODEL as WEIGHTS, CanonicalReader
    from ofa_scale.training.config import load_training_config
    from ofa_scale.training.layout_resume import canonical_dir
    from ofa_scale.training.workload import tokenizer_and_model_config

    cfg = load_training_config(run / "config.yaml")
    model_config = tokenizer_and_model_config(cfg)[1]
    assert model_config.image_stem == "vit_b16"
    trained = CanonicalReader(canonical_dir(run_checkpoint(run))).view(WEIGHTS)
    stem = sorted(n for n in trained.names() if n.startswith("encoder.embed_images."))
    assert len(stem) == 112 and "encoder.embed_images.transformer.resblocks.8.mlp.c_proj.weight" in stem
    initial = InitialWeights(model_config, cfg.train.seed)
    for name in ("encoder.embed_images.conv1.weight", "encoder.embed_images.transformer.resblocks.8.mlp.c_fc.weight"):
        assert not torch.equal(trained.read(name), initial[name]), f"{name} did not move"

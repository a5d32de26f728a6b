"""End to end (issue 10 §7): the RefCOCO recipe, shrunk to this machine, localises referred shapes on held-out
synthetic images after a short finetune from scratch, through the real CLIs, where the whole-image box (the
issue's baseline) and the best constant box score (almost) nothing.

Data: `ofa-preprocess sample`'s RefCOCO TSVs (1-4 shapes per scene on a textured background; each expression
true of one shape: its name, its size or left/right; held-out splits from other random streams) →
`ofa-preprocess shards --format refcoco` → `ofa-train --config configs/finetune/refcoco_base.yaml` (1 process, a
tiny OFA at 64 px) → `ofa-eval run` on the test split (beam 5, exactly 4 bins, Acc@0.5 with OFA's rule, boxes in
the original image's pixels). The baseline is the whole-image box (ofa_scale/finetune/baselines.py), scored by the
task on the same items.

Measured (`pytest -s -m slow tests/finetune/test_refcoco_e2e.py`): **Acc@0.5 0.152 (17 of 112 test rows) against
the whole-image box's 0.0**, 65 distinct boxes; the best constant box scores 0.018 (a grid search over centred
squares on 3,000 training rows). The model has learnt where a shape is far better than which shape is meant:
0.69 (11 of 16) on rows whose scene has one shape, 0.06 (6 of 96) on the rest. Training took 1,122 s with another
run beside it for most of it (~10 minutes of one core alone); 600 updates give 0.098.

What it takes (Acc@0.5 on held-out rows; the settings below unless named):
* **Many images, each seen about once.** Where a shape is, is learnt quickly; which of several shapes the
  expression means, slowly (0.69 against 0.06 above). On the VL module's 768 images (1,344 rows, ~7 epochs in 600
  updates) the model memorises instead: 0.0-0.03 at every validation, from scratch or from that module's VQA
  model. Here 8,192 images (14,282 rows; 1,000 updates of 16 see 16,000).
* **lr 6e-4**, 1,000 updates: at 3e-4 the best validation (update 600) scores 0.071 on test.
* **32 bins over the 64-px input** (`objectives.num_bins=32`, `task.box_normaliser=64`, a tokenizer with
  `--num-bins 32`): 2 px a bin. OFA's 1,000 bins over 512 px leave the 64-px input 125 bins, one target in 125 per
  coordinate, none shared with its neighbours.
* **No dropout, drop-path or label smoothing**: the recipe's 0.1s regularise a pretrained model over 10 epochs;
  this one sees each row about once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_recipes_e2e import TINY_OFA, sample_splits, train_then_evaluate, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "finetune" / "refcoco_base.yaml"
TRAIN_IMAGES, TEST_IMAGES = 8192, 64
STEPS = 1000
NUM_BINS, IMAGE_SIZE = 32, 64
MARGIN = 0.08  # Acc@0.5 above the whole-image box's
MIN_DISTINCT = 0.5  # distinct boxes among the test predictions, as a fraction: a constant box cannot pass
MODEL = [*TINY_OFA, f"task.image_size={IMAGE_SIZE}", f"task.box_normaliser={IMAGE_SIZE}",
         f"objectives.num_bins={NUM_BINS}"]
TRAIN = ["model.pretrained=null", "train.global_batch_size=16", "train.micro_batch_size=16",
         "train.log_interval=20", "train.ckpt_interval=100000", "data.num_workers=0", "task.valid_interval=200",
         "task.valid_limit=64", "optim.lr=6e-4", "logging.mlflow=false", "model.overrides.dropout=0.0",
         "model.overrides.encoder_drop_path_rate=0.0", "model.overrides.decoder_drop_path_rate=0.0",
         "objectives.label_smoothing=0.0", f"train.steps={STEPS}"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from ofa_scale.objectives.builders import GROUNDING_PROMPT

    root = tmp_path_factory.mktemp("refcoco_e2e")
    tsv = sample_splits(root, "refcoco", ["--finetune-images", str(TRAIN_IMAGES), "--finetune-eval-images",
                                          str(TEST_IMAGES), "--text-rows", "0", "--image-gen-rows", "0"])
    expressions = [row.split("\t")[2] for row in (tsv / "refcoco_train.tsv").read_text().splitlines()]
    train_tokenizer(root, expressions + [GROUNDING_PROMPT] * 20, 300, ("--num-codes", "0", "--num-bins", str(NUM_BINS)))
    return root


def test_a_short_finetune_beats_the_whole_image_box(data):
    from ofa_scale.data.tokenizer import load_tokenizer
    from ofa_scale.finetune.baselines import baseline_metrics
    from ofa_scale.finetune.task import make_task
    from ofa_scale.training.config import load_training_config

    out, train_s, eval_s = train_then_evaluate(RECIPE, data, "refcoco", MODEL, TRAIN, timeout=3000)
    accuracy = json.loads((out / "metrics.json").read_text())["acc@0.5"]
    boxes = [tuple(r["box"]) for r in json.loads((out / "results.json").read_text())]

    cfg = load_training_config(RECIPE, [v.format(data=data) for v in MODEL])
    task = make_task(cfg.task, load_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path,
                                              num_bins=cfg.objectives.num_bins))
    _, base = baseline_metrics(task, data / "train", data / "test")
    print(f"\nrefcoco: acc@0.5 {accuracy:.4f} finetuned vs {base['acc@0.5']:.4f} whole-image box: margin "
          f"{accuracy - base['acc@0.5']:+.4f}; {len(set(boxes))} distinct boxes of {len(boxes)}; {STEPS} updates, "
          f"train {train_s:.0f}s, eval {eval_s:.0f}s")
    assert accuracy > base["acc@0.5"] + MARGIN
    assert len(set(boxes)) >= MIN_DISTINCT * len(boxes)

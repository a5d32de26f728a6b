"""OFA-CN end to end (issue 13 §1): the MUGE caption recipe with the BERT tokenizer and Chinese prompt, shrunk to a
tiny model, trains through `ofa-train` and is scored by `ofa-eval run`.

Data: 32-px pictures of one coloured shape on white, captioned in Chinese from the pixels ("一个红色的圆形"),
converted with `ofa-preprocess shards --format caption` (MUGE's files have COCO caption's columns). The vocab.txt
holds BERT's specials and every character of the captions and the prompt, so nothing is [UNK].
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.finetune.engine_data import REPO, _run, read_metrics

# ~40 s of CPU (two subprocesses: 60 updates, then `ofa-eval run`), minutes of wall time on a shared machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COLOURS = {"红色": (220, 30, 30), "绿色": (30, 200, 40), "蓝色": (30, 40, 220), "黄色": (230, 220, 30)}
SHAPES = ("圆形", "方形")
TEMPLATES = ("一个{c}的{s}", "白色背景上有一个{c}的{s}")
PROMPT_CHARS = "图片描述了什么内容?"
CJK = re.compile(r"[\u4e00-\u9fff]")
RECIPE = REPO / "configs" / "finetune" / "muge_caption_base.yaml"
# the recipe shrunk: tiny model, 32-px images, from scratch (nothing to keep frozen), short decoding
MODEL = ["model.arch=ofa_tiny", "model.overrides.d_model=64", "model.overrides.ffn_dim=128", "model.overrides.heads=2",
         "model.overrides.encoder_layers=1", "model.overrides.decoder_layers=1", "model.overrides.dropout=0.0",
         "model.overrides.encoder_drop_path_rate=0.0", "model.overrides.decoder_drop_path_rate=0.0",
         "task.image_size=32", "task.max_tgt_length=16", "task.decoding.beam=2", "task.decoding.max_len_b=12",
         "task.decoding.batch_size=8", "precision=fp32"]
TRAIN = ["model.pretrained=null", "train.epochs=3", "train.steps=60", "train.global_batch_size=8",
         "train.micro_batch_size=8", "train.log_interval=1", "train.ckpt_interval=100000",
         "train.freeze_encoder_embedding=false", "train.freeze_decoder_embedding=false", "data.num_workers=0",
         "data.shuffle_buffer=8", "task.valid_interval=0", "task.valid_limit=4", "optim.lr=1e-2",
         "schedule.warmup_ratio=0.0", "schedule.warmup_steps=2", "objectives.drop_worst_ratio=0.0",
         "objectives.label_smoothing=0.0",
         "logging.mlflow=false"]


def _picture(colour, shape: str) -> str:
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "圆形" else draw.rectangle)((6, 6, 26, 26), fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return base64.urlsafe_b64encode(buf.getvalue()).decode()


def _rows(start: int, n: int) -> list[tuple[int, str, str]]:
    """(image id, caption, image) rows cycling through every colour x shape x template."""
    rows = []
    for i in range(start, start + n):
        (name, rgb), shape = list(COLOURS.items())[i % 4], SHAPES[(i // 4) % 2]
        rows.append((i, TEMPLATES[(i // 8) % 2].format(c=name, s=shape), _picture(rgb, shape)))
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caption_cn")
    splits = {"train": _rows(0, 160), "test": _rows(1000, 8)}  # 20 updates per epoch: 3 validations
    chars = set(PROMPT_CHARS)
    for split, rows in splits.items():
        (root / f"{split}.tsv").write_text("".join(f"{i}\t{i}\t{cap}\t\t{img}\n" for i, cap, img in rows))
        chars |= {ch for _, cap, _ in rows for ch in cap}
        _run([sys.executable, "-m", "ofa_scale.cli.preprocess", "shards", "--format", "caption", "--input",
              str(root / f"{split}.tsv"), "--out", str(root / split), "--no-progress", "--workers", "1"])
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(chars)])
                                             + "\n", encoding="utf-8")
    return root


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def test_chinese_caption_finetune_trains_and_evaluates(data):
    py, run, out = sys.executable, data / "run", data / "eval"
    common = _sets(MODEL + [f"data.tokenizer.path={data / 'bert'}"])
    _run([py, "-m", "ofa_scale.train", "--config", str(RECIPE), "--run-dir", str(run), *common, *_sets(TRAIN),
          "--set", f"data.train={data / 'train'}", "--set", f"data.valid={data / 'test'}"], timeout=500)
    metrics = read_metrics(run)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"\ncaption zh: loss {first:.3f} (first 5 updates) -> {last:.3f} (last 5)")
    assert last < 0.3 * first
    assert any("valid/cider" in m for m in metrics)

    _run([py, "-m", "ofa_scale.cli.evaluate", "run", "--config", str(RECIPE), "--checkpoint", str(run), "--data",
          str(data / "test"), "--out", str(out), *common], timeout=300)
    scores = json.loads((out / "metrics.json").read_text())
    results = json.loads((out / "results.json").read_text())
    print(f"caption zh: {scores}; e.g. {results[0]}")
    # MUGE's metrics on characters (no METEOR); a trained model shares characters with the references
    assert {"cider", "bleu4", "rouge_l"} <= set(scores) and "meteor" not in scores
    assert scores["rouge_l"] > 0.4
    assert len(results) == 8 and {r["image_id"] for r in results} == set(range(1000, 1008))
    vocab = set((data / "bert" / "vocab.txt").read_text(encoding="utf-8").split("\n"))
    for r in results:
        chars = r["caption"].split()
        # BERT-decoded Chinese: one character per space-separated word, every one from the vocabulary
        assert chars and all(CJK.fullmatch(c) and c in vocab for c in chars), r

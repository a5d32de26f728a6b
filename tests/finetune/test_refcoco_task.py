"""The RefCOCO task module (spec §7.3): exact builder tokens and bins, records from real shards (also downscaled
ones), bin-constrained prediction on a tiny random model, Acc@0.5, and the box results file."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import ofa_scale.finetune.refcoco as refcoco_module
from ofa_scale.data.image_ops import to_uint8_tensor
from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.evaluation.tasks import ScoreOptions, task_spec
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.task import make_task
from ofa_scale.model import OFAConfig, OFAModel

sys.path.insert(0, str(Path(__file__).parent))
from tsv_shards import image_b64, shard_records  # noqa: E402

BOS, EOS = 0, 2
BIN0 = 58457  # OFA's id of <bin_0> (spec §7.3: bin = token − 58457)
TINY = dict(d_model=64, ffn_dim=128, heads=4, encoder_layers=1, decoder_layers=1)
OFA_DECODING = DecodingSection(beam=5, min_len=4, max_len_b=4, no_repeat_ngram_size=3, batch_size=2)


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


def make(tok, size=512, normaliser=512.0):
    cfg = TaskSection(name="refcoco", image_size=size, box_normaliser=normaliser, decoding=OFA_DECODING)
    cfg.validate()
    return make_task(cfg, tok)


def record(text, box, image, uniq_id="r1"):
    return {"key": "k", "meta": {"uniq_id": uniq_id, "source": "refcoco", "image_id": "9", "text": text,
                                 "box": list(box), "image": {"width": image.width, "height": image.height,
                                                             "orig_width": image.width,
                                                             "orig_height": image.height, "scale": 1.0}},
            "image": image}


def test_train_example_tokens_and_hand_checked_bins(tok):
    task = make(tok)
    img = Image.new("RGB", (100, 50), (30, 60, 90))
    [ex] = task.train_examples(record("  The Man-on/the LEFT.", [10, 5, 60, 45], img))
    # box × (512/100, 512/50) = (51.2, 51.2, 307.2, 460.8); /512·999 = (99.9, 99.9, 599.4, 899.1) → rounded
    bins = [BIN0 + 100, BIN0 + 100, BIN0 + 599, BIN0 + 899]
    assert [tok.bin_token(b) for b in (100, 100, 599, 899)] == bins
    assert ex["target"] == bins + [EOS] and ex["prev_output"] == [BOS] + bins
    assert ex["source"] == [BOS] + tok.encode(' which region does the text " the man on the left. " describe?') + [EOS]
    assert ex["task"] == "refcoco" and ex["patch_mask"] is True and ex["conf"] == 1.0
    assert torch.equal(ex["image"], to_uint8_tensor(img.resize((512, 512), Image.Resampling.BICUBIC)))
    src_len, tgt_len = task.lengths()
    assert tgt_len == 5 and src_len >= len(ex["source"])


def test_expression_is_cut_to_max_src_length_words(tok):
    cfg = TaskSection(name="refcoco", image_size=512, max_src_length=3)
    task = make_task(cfg, tok)
    [ex] = task.train_examples(record("one two three four five", [0, 0, 10, 10], Image.new("RGB", (20, 20))))
    assert ex["source"] == [BOS] + tok.encode(' which region does the text " one two three " describe?') + [EOS]


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    rows = [["r1", "11", "left half", "0,0,60,60", image_b64(120, 60)],
            ["r2", "11", "right half", "60,0,120,60", image_b64(120, 60)],
            ["r3", "12", "the top", "5.5,2,40.25,20", image_b64(48, 40, (20, 220, 20))]]
    return {"stored": shard_records(tmp_path_factory.mktemp("refcoco"), "refcoco", rows),
            # shorter side 30: the converter halves the 120×60 images (and their boxes)
            "downscaled": shard_records(tmp_path_factory.mktemp("refcoco_small"), "refcoco", rows,
                                        "--downscale-shorter-side", "30")}


def _bin_tokens_of(task, rec):
    [ex] = task.train_examples(rec)
    return torch.tensor(ex["target"])


def test_gold_bins_decode_back_to_the_box(tok, recs, monkeypatch):
    """train_examples' bins, fed through predict's token → box path, give back the TSV box (in original pixels
    in results.json) to within one bin, also when the converter stored a smaller image."""
    task = make(tok, size=64, normaliser=64.0)
    for kind in ("stored", "downscaled"):
        records = recs[kind]
        items = [task.eval_item(r) for r in records]
        gold = [_bin_tokens_of(task, r) for r in records]
        monkeypatch.setattr(refcoco_module, "best_tokens", lambda *a, **k: gold)
        preds = task.predict(None, items, device=torch.device("cpu"))
        assert task.score(preds, items) == {"acc@0.5": 1.0}
        tsv_boxes = [[0, 0, 60, 60], [60, 0, 120, 60], [5.5, 2, 40.25, 20]]
        for pred, item, tsv_box in zip(preds, items, tsv_boxes):
            w, h = item.image_size
            # one bin is 64/999 input pixels, i.e. side/999 pixels of an image whose longer side is `side`
            assert pred["box"] == pytest.approx(item.reference["box"], abs=max(w, h) / 999)
            entry = task.result_entry(pred)
            assert entry["uniq_id"] == item.id and entry["box"] == pytest.approx(tsv_box, abs=120 / 999)
    assert recs["downscaled"][0]["image"].size == (60, 30) and recs["downscaled"][0]["meta"]["box"] == [0, 0, 30, 30]
    assert [i.id for i in items] == ["r1", "r2", "r3"]


@pytest.fixture(scope="module")
def tiny_model(tok):
    torch.manual_seed(0)
    return OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=len(tok), **TINY)).eval()


def test_predict_score_and_results_on_tiny_model(tok, recs, tiny_model, tmp_path, monkeypatch):
    task = make(tok, size=64, normaliser=64.0)
    items = [task.eval_item(r) for r in recs["stored"]]
    assert items[0].decoder_prompt == [BOS] and items[0].image.shape == (3, 64, 64)
    generated = []
    real = refcoco_module.best_tokens
    monkeypatch.setattr(refcoco_module, "best_tokens", lambda *a, **k: generated.extend(real(*a, **k)) or generated)
    preds = task.predict(tiny_model, items, device=torch.device("cpu"))
    # a random model decodes exactly 4 bins then eos: decoding is restricted to bins, min/max length 4
    assert [[tok.is_bin(t) for t in g.tolist()] for g in generated] == [[True] * 4 + [False]] * 3
    assert all(g[-1] == EOS for g in generated)
    assert [p["id"] for p in preds] == ["r1", "r2", "r3"]
    for p, item in zip(preds, items):
        w, h = item.image_size
        # bin-constrained decoding: exactly 4 bins, so the box lies inside the (stored) image
        assert len(p["bins"]) == 4 and all(isinstance(b, int) and 0 <= b < tok.num_bins for b in p["bins"])
        x0, y0, x1, y1 = p["box"]
        assert 0 <= x0 <= w and 0 <= x1 <= w and 0 <= y0 <= h and 0 <= y1 <= h
    acc = task.score(preds, items)["acc@0.5"]
    assert set(task.score(preds, items, final=True)) == {"acc@0.5"} and 0.0 <= acc <= 1.0
    path = tmp_path / "results.json"
    path.write_text(json.dumps([task.result_entry(p) for p in preds]))
    entries = json.loads(path.read_text())
    assert [set(e) for e in entries] == [{"uniq_id", "box"}] * 3 and all(isinstance(e["uniq_id"], str) for e in entries)
    # read back by the project's box scorer (`ofa-eval score`), which must reproduce the task's Acc@0.5
    spec = task_spec("refcoco")
    boxes = [spec.read_prediction({"id": e["uniq_id"], "box": e["box"]}, {}) for e in entries]
    refs = [spec.read_reference({"id": i.id, "box": i.reference["box"]}) for i in items]
    assert spec.score(boxes, refs, ScoreOptions()).metrics["acc@0.5"] == acc


def test_acc_at_half_uses_ofa_rule(tok, recs):
    task = make(tok, size=64, normaliser=64.0)
    items = [task.eval_item(r) for r in recs["stored"][:2]]
    preds = [{"id": "r1", "box": [0, 0, 60, 50], "bins": [0] * 4},   # IoU 50·60/3600 = 0.83 → hit
             {"id": "r2", "box": [0, 0, 60, 60], "bins": [0] * 4}]   # shares only the edge x = 60 → miss
    assert task.score(preds, items) == {"acc@0.5": 0.5}

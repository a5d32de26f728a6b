"""The caption task module (spec §7.1): exact builder tokens, records from real shards, prediction on a tiny
random model, validation / COCOEvalCap scores, and results.json read back by pycocotools + pycocoevalcap."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofa_scale.data.image_ops import to_uint8_tensor
from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.task import EvalItem, make_task
from ofa_scale.model import OFAConfig, OFAModel

sys.path.insert(0, str(Path(__file__).parent))
from tsv_shards import image_b64, shard_records  # noqa: E402

BOS, EOS = 0, 2
CAPTION_SRC = [0, 99, 473, 5, 2274, 6190, 116, 2]  # OFA's ids of bos " what does the image describe?" eos
S = 64
TINY = dict(d_model=64, ffn_dim=128, heads=4, encoder_layers=1, decoder_layers=1)


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


@pytest.fixture(scope="module")
def task(tok):
    cfg = TaskSection(name="caption", image_size=S,
                      decoding=DecodingSection(beam=5, max_len_b=16, no_repeat_ngram_size=3, min_len=1, batch_size=2))
    cfg.validate()
    return make_task(cfg, tok)


def record(caption, image=None, image_id="7", uniq_id="u1"):
    captions = [c for c in caption.split("&&") if c]
    return {"key": "k", "meta": {"uniq_id": uniq_id, "source": "caption", "image_id": image_id, "caption": caption,
                                 "objects": [], "captions": captions},
            "image": image if image is not None else Image.new("RGB", (40, 30), (10, 200, 30))}


def test_train_example_tokens(task, tok):
    img = Image.new("RGB", (50, 30), (120, 30, 200))
    img.paste((0, 0, 0), (0, 0, 10, 10))
    [ex] = task.train_examples(record("a man riding a horse", img))
    expected = tok.encode(" a man riding a horse")
    assert ex["task"] == "caption" and ex["patch_mask"] is True and ex["conf"] == 1.0
    assert ex["source"] == [tok.bos] + tok.encode(" what does the image describe?") + [tok.eos] == CAPTION_SRC
    assert ex["target"] == expected + [EOS]
    assert ex["prev_output"] == [BOS] + expected and len(ex["prev_output"]) == len(ex["target"])
    assert ex["image"].dtype == torch.uint8 and ex["image"].shape == (3, S, S)
    assert torch.equal(ex["image"], to_uint8_tensor(img.resize((S, S), Image.Resampling.BICUBIC)))
    assert ex["references"] == ["a man riding a horse"]
    src_len, tgt_len = task.lengths()
    assert src_len == len(CAPTION_SRC) and tgt_len >= len(ex["target"])


def test_punctuation_and_twenty_word_cut_hand_checked(task, tok):
    # every ASCII punctuation character is deleted (inside words too), case is kept, words are whitespace-split
    [ex] = task.train_examples(record("  A man's bike,  (red)... rides-on the hill!\t"))
    assert ex["target"] == tok.encode(" A mans bike red rideson the hill") + [EOS]
    words = " ".join(f"w{i}," for i in range(25))
    [ex] = task.train_examples(record(words))
    assert tok.decode(ex["target"][:-1]) == " " + " ".join(f"w{i}" for i in range(20))
    assert task.train_examples(record("?!...")) == []  # nothing left to learn


def test_stage2_row_keeps_all_references(task, tok):
    [ex] = task.train_examples(record("a dog, running.&&A brown dog!&&the dog runs"))
    assert ex["references"] == ["a dog running", "A brown dog", "the dog runs"]
    assert ex["target"] == tok.encode(" a dog running") + [EOS]  # CE on a multi-caption row: its first caption


@pytest.fixture(scope="module")
def shard_recs(tmp_path_factory):
    rows = [["1", "391895", "a man, riding a bike.&&A person on a bike!", "bike&&man", image_b64(40, 30)],
            ["2", "522418", "a red square&&a square that is red", "", image_b64(48, 32, (30, 30, 220))],
            ["3", "img_7", "two dogs", "dog", image_b64(32, 32, (20, 220, 20))]]
    return shard_records(tmp_path_factory.mktemp("caption"), "caption", rows)


def test_records_from_real_shards(task, tok, shard_recs):
    items = [task.eval_item(r) for r in shard_recs]
    assert [i.id for i in items] == [391895, 522418, "img_7"]  # TSV image-ids; all-digit ones become ints
    assert items[0].reference["captions"] == ["a man, riding a bike.", "A person on a bike!"]
    assert items[0].source == CAPTION_SRC and items[0].decoder_prompt == [BOS]
    assert items[0].image.shape == (3, S, S) and items[0].image_size == (40, 30)
    [ex] = task.train_examples(shard_recs[0])
    assert ex["target"] == tok.encode(" a man riding a bike") + [EOS]
    assert ex["references"] == ["a man riding a bike", "A person on a bike"]


@pytest.fixture(scope="module")
def tiny_model(tok):
    torch.manual_seed(0)
    return OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=len(tok), **TINY)).eval()


def test_predict_score_and_results_on_tiny_model(task, shard_recs, tiny_model):
    items = [task.eval_item(r) for r in shard_recs]
    preds = task.predict(tiny_model, items, device=torch.device("cpu"))
    assert [p["id"] for p in preds] == [i.id for i in items]
    assert all(isinstance(p["caption"], str) for p in preds)
    scores = task.score(preds, items)
    assert set(scores) == {"cider", "bleu4", "rouge_l"}  # validation: no METEOR
    assert all(math.isfinite(v) and v >= 0 for v in scores.values())
    entries = [task.result_entry(p) for p in preds]
    assert [type(e["image_id"]) for e in entries] == [int, int, str]
    assert all(set(e) == {"image_id", "caption"} for e in entries)
    # predictions that pair with other items are refused, not scored against the wrong references
    with pytest.raises(Exception, match="do not pair"):
        task.score(preds[::-1], items)


def test_validation_scores_hand_checked(task):
    items = [EvalItem(1, CAPTION_SRC, torch.zeros(3, S, S, dtype=torch.uint8), [BOS],
                      {"captions": ["a red square, on the table.", "the red square"]}, (S, S))]
    # punctuation and case are dropped before scoring, so the hypothesis equals the first reference
    scores = task.score([{"id": 1, "caption": "A red square on the table"}], items)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6) and scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider"] == pytest.approx(0.0)  # one image: every n-gram is in every "document", idf 0


class _FakeScorer:
    """Stands in for a Java scorer in COCOEvalCap: SPICE downloads Stanford models at first use, and METEOR
    takes 10-50 s to load its paraphrase tables on this machine. The inputs it receives are recorded, so the
    test still checks that our METEOR gets exactly COCOEvalCap's (PTB-tokenised) input; that our `meteor` equals
    pycocoevalcap's on the same input is tests/evaluation's business."""

    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def compute_score(self, gts, res):
        self.seen[self.name] = ([gts[k] for k in gts], [res[k] for k in gts])
        return 0.25, [0.25] * len(res)

    def method(self):
        return self.name


def test_results_json_read_by_coco_tools_and_final_scores_match(task, tmp_path, monkeypatch):
    import numpy as np
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    import ofa_scale.evaluation.metrics.meteor as meteor_module

    refs = {391895: ["a man riding a bike.", "A person on a bike!"],
            522418: ["a red square on a table", "a square that is red"],
            7: ["two dogs play in the grass", "dogs playing outside"]}
    hyps = {391895: "a man rides a bike", 522418: "a red square", 7: "two dogs in the grass"}
    items = [EvalItem(i, CAPTION_SRC, torch.zeros(3, S, S, dtype=torch.uint8), [BOS], {"captions": c}, (S, S))
             for i, c in refs.items()]
    preds = [{"id": i, "caption": hyps[i]} for i in refs]
    (tmp_path / "results.json").write_text(json.dumps([task.result_entry(p) for p in preds]))
    gt = {"images": [{"id": i} for i in refs], "info": {}, "licenses": [], "type": "captions",
          "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                          for i, cs in refs.items() for k, c in enumerate(cs)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = COCO(str(tmp_path / "gt.json"))
    res = coco.loadRes(str(tmp_path / "results.json"))
    assert sorted(res.getImgIds()) == sorted(refs)
    seen = {}
    monkeypatch.setattr(coco_eval, "Spice", lambda: _FakeScorer("SPICE", seen))
    monkeypatch.setattr(coco_eval, "Meteor", lambda: _FakeScorer("METEOR", seen))
    evaluator = coco_eval.COCOEvalCap(coco, res)
    evaluator.evaluate()

    def our_meteor(gts, res):
        seen["ours"] = ([gts[k] for k in gts], [res[k] for k in gts])
        return 0.25, np.full(len(res), 0.25)

    monkeypatch.setattr(meteor_module, "meteor", our_meteor)
    ours = task.score(preds, items, final=True)
    assert seen["ours"] == seen["METEOR"]  # the final protocol runs METEOR, on COCOEvalCap's PTB tokens
    assert seen["ours"][1][1] == ["a red square"]
    assert seen["ours"][0][0] == ["a man riding a bike", "a person on a bike"]
    expected = {"bleu4": evaluator.eval["Bleu_4"], "meteor": evaluator.eval["METEOR"],
                "rouge_l": evaluator.eval["ROUGE_L"], "cider": evaluator.eval["CIDEr"]}
    assert ours == pytest.approx(expected, abs=1e-9)
    assert ours["cider"] > 0.5 and ours["rouge_l"] > 0.5 and ours["bleu4"] > 0  # a meaningful case, not zeros


def test_lockstep_reaches_generation(task, shard_recs, tiny_model):
    """Distributed evaluation hands `lockstep` to generation; on one rank it changes nothing."""
    items = [task.eval_item(r) for r in shard_recs]
    calls = []

    def lockstep(done):
        calls.append(done)
        return done  # one rank: everyone is done when this rank is

    alone = task.predict(tiny_model, items, device=torch.device("cpu"))
    assert task.predict(tiny_model, items, device=torch.device("cpu"), lockstep=lockstep) == alone
    assert calls and calls[-1] is True

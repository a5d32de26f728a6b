"""The SNLI-VE task module (spec §7.4, §6.1, §6.3): builder tokens, trie-constrained loss, shards, prediction,
accuracy, results entries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import UserError
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.snli_ve import LABELS, SNLIVETask
from ofa_scale.finetune.task import make_task

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from closed_set_helpers import (collate, constrained_loss_gradient, jpeg_b64, shard_records,  # noqa: E402
                                smoothed_loss, tiny_model)
from test_generate import biased_towards  # noqa: E402

BOS, PAD, EOS = 0, 1, 2
YES, NO, MAYBE = 4420, 117, 2085  # spec §3, verified ids


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


def make(tok, **kw) -> SNLIVETask:
    fields = dict(name="snli_ve", prompt_type="prev_output", add_caption=True, image_size=32)
    fields.update(kw)
    return make_task(TaskSection(**fields), tok)


def record(hypothesis="A man", caption="Two men sit on a bench.", label="yes", uid="s1"):
    return {"key": uid, "meta": {"uniq_id": uid, "image_id": "img", "hypothesis": hypothesis, "caption": caption,
                                 "label": label},
            "image": Image.new("RGB", (40, 30), (10, 200, 10))}


# ------------------------------------------------------------------------------------------- builder tokens
def test_literal_tokens_hand_checked(tok):
    """' does the image describe " a man "?' from spec §3's verified pieces (Ġdoes 473, Ġthe 5, Ġimage 2274,
    Ġdescribe 6190, Ġ" 22, Ġa 10, Ġman 313, ? 116)."""
    task = make(tok, add_caption=False)
    ex, = task.train_examples(record())
    prompt = [0, 473, 5, 2274, 6190, 22, 10, 313, 22, 116]
    assert ex["source"] == prompt + [2]
    assert ex["prev_output"] == prompt + [YES]
    assert ex["target"] == [1] * 9 + [YES, 2]
    assert ex["constraint"] == [[]] * 9 + [[NO, YES, MAYBE], [2]]
    assert ex["conf"] == 1.0 and ex["task"] == "snli_ve" and ex["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("label, word_id", [("no", NO), ("yes", YES), ("maybe", MAYBE)])
def test_premise_prompt_tokens(tok, label, word_id):
    task = make(tok, max_src_length=4)
    ex, = task.train_examples(record(hypothesis="A man-sits there now.", caption="Two men sit on a bench.",
                                     label=label))
    # pre_caption: lower case, '-' -> ' ', the first 4 words
    text = ' can image and text1 " two men sit on " imply text2 " a man sits there "?'
    source = [BOS] + tok.encode(text) + [EOS]
    assert ex["source"] == source
    assert ex["prev_output"] == source[:-1] + [word_id]
    assert ex["target"] == [PAD] * (len(source) - 2) + [word_id, EOS]
    assert ex["constraint"] == [[]] * (len(source) - 2) + [[NO, YES, MAYBE], [EOS]]


def test_lengths_cover_the_longest_prompt(tok):
    task = make(tok)
    s, t = task.lengths()
    template = len(tok.encode(' can image and text1 "  " imply text2 "  "?'))
    assert s == template + 2 + 2 * 2 * 80 and t == s - 1 + 1  # prompt source[:-1] + one answer token
    ex, = task.train_examples(record(hypothesis=" ".join(["dog"] * 80), caption=" ".join(["cat"] * 80)))
    assert len(ex["source"]) <= s and len(ex["target"]) <= t and task.skipped["source_truncated"] == 0


def test_unknown_label_is_skipped_and_counted(tok):
    task = make(tok)
    assert task.train_examples(record(label="entailment")) == []  # shards store the answer word, not the label
    assert task.skipped["answer_not_in_candidates"] == 1


# ------------------------------------------------------------------------------ trie-constrained loss
def test_constrained_loss_puts_no_mass_outside_the_labels_smoothing_included(tok):
    task = make(tok, extra={"source_length": 40})
    examples = [task.train_examples(record(label=w, uid=f"s{i}"))[0] for i, w in enumerate(LABELS)]
    batch = collate(examples, "snli_ve", task.lengths(), 32, len(tok))
    masks, target = batch["constraint_masks"], batch["target"]
    assert batch["task_ids"].tolist() == [0, 0, 0]
    loss, grad = constrained_loss_gradient(masks, target, batch["conf"])
    valid = target != PAD
    assert int(valid.sum()) == 6  # label + eos per example
    assert float(grad[valid][~masks[valid]].abs().max()) == 0.0
    assert float(grad[~valid].abs().max()) == 0.0
    label_pos = [(i, len(ex["target"]) - 2) for i, ex in enumerate(examples)]
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(*masks.shape, generator=g)
    for (b, t), word in zip(label_pos, (NO, YES, MAYBE)):
        assert masks[b, t].nonzero().flatten().tolist() == sorted([NO, YES, MAYBE])
        assert float(grad[b, t, [NO, YES, MAYBE]].abs().min()) > 0
        assert float(loss[b, t]) == pytest.approx(smoothed_loss(logits[b, t], masks[b, t], word, 0.1), rel=1e-5)
        assert float(loss[b, t + 1]) == pytest.approx(0.0, abs=1e-6)  # eos is the only choice: certain


# -------------------------------------------------------------------------------------------- shards
def test_records_read_back_from_real_shards(tok, tmp_path):
    rows = [["s1", "img1", jpeg_b64(48, 40, 1), "A dog runs", "a dog in a park", "entailment"],
            ["s2", "img1", jpeg_b64(48, 40, 2), "a cat sleeps", "a dog in a park", "contradiction"],
            ["s3", "img2", jpeg_b64(40, 48, 3), "the dog is happy", "a dog in a park", "neutral"]]
    records = shard_records(tmp_path, "snli_ve", rows)
    task = make(tok)
    exs = [task.train_examples(r)[0] for r in records]
    assert exs[0]["source"] == [BOS] + tok.encode(' can image and text1 " a dog in a park " imply text2 " a dog '
                                                  'runs "?') + [EOS]
    assert [ex["target"][-2] for ex in exs] == [YES, NO, MAYBE]
    items = [task.eval_item(r) for r in records]
    assert [i.id for i in items] == ["s1", "s2", "s3"]
    assert [i.reference for i in items] == [{"label": "yes"}, {"label": "no"}, {"label": "maybe"}]
    assert items[2].image_size == (40, 48) and items[0].decoder_prompt == exs[0]["source"][:-1]


# ------------------------------------------------------------------------------------------ prediction
@pytest.fixture(scope="module")
def model():
    return tiny_model()


def items_for(task):
    recs = [record(hypothesis=h, label=w, uid=f"u{i}") for i, (h, w) in
            enumerate([("a man", "yes"), ("a dog", "no"), ("a red car", "maybe"), ("two men", "yes")])]
    return [task.eval_item(r) for r in recs]


@pytest.mark.parametrize("favourite", ["no", "maybe"])
def test_allcand_predicts_labels_beam_agrees_and_accuracy(tok, model, favourite):
    allcand = make(tok, decoding=DecodingSection(inference="allcand", batch_size=3))
    beam = make(tok, decoding=DecodingSection(inference="beam", beam=3, unnormalized=True, batch_size=3))
    items = items_for(allcand)
    with biased_towards(model, tok.encode(" " + favourite)[0], strength=10.0):
        a = allcand.predict(model, items, device=torch.device("cpu"))
        b = beam.predict(model, items, device=torch.device("cpu"))
    assert [p["label"] for p in a] == [favourite] * 4
    assert b == a
    expected = sum(i.reference["label"] == favourite for i in items) / 4
    assert allcand.score(a, items) == {"accuracy": pytest.approx(expected)}
    results = json.loads(json.dumps([allcand.result_entry(p) for p in a]))
    assert results[0] == {"uniq_id": "u0", "answer": favourite}
    assert all(type(r["uniq_id"]) is str and r["answer"] in LABELS for r in results)


def test_score_needs_paired_predictions(tok):
    task = make(tok)
    items = items_for(task)
    preds = [{"id": i.id, "label": "yes"} for i in items]
    assert task.score(preds, items) == {"accuracy": pytest.approx(0.5)}
    with pytest.raises(UserError):
        task.score(preds[:2], items)
    assert task.main_metric == "accuracy" and task.name == task.source == "snli_ve"

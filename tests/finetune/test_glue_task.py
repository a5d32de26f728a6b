"""The GLUE task module (spec §7.8): templates, label words, the `src` one-token example and its constraint,
all-candidate prediction = argmax of the label-masked logits at the source's eos, metrics, results entries,
and the converter's seven formats read back from shards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ofa_scale.data.sample_text_tasks import ROWS
from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import ConfigError
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.glue import LABEL_WORDS, TEMPLATES
from ofa_scale.finetune.task import make_task

sys.path.insert(0, str(Path(__file__).parent))
from closed_set_helpers import collate, constrained_loss_gradient, tiny_model  # noqa: E402
from tsv_shards import shard_records  # noqa: E402

BOS, PAD, EOS = 0, 1, 2
YES, NO, MAYBE, POSITIVE, NEGATIVE = 4420, 117, 2085, 1313, 2430  # GPT-2 BPE ids of " yes", " no", …
GLUE = sorted(TEMPLATES)


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


def make(tok, name, **kw):
    fields = dict(name=name, prompt_type="src", image_size=16, decoding=DecodingSection(inference="allcand"))
    fields.update(kw)
    return make_task(TaskSection(**fields), tok)


def record(meta, uid="7"):
    return {"key": uid, "meta": {"uniq_id": uid, **meta}, "image": None, "seed": 3}


# ------------------------------------------------------------------------------------------- templates / words
# the spec §7.8 table, written out: task -> (record fields, the source text they give)
SOURCES = {
    "glue_cola": ({"sentence": "The  Cat SAT."}, ' is the text " the cat sat. " grammatically correct?'),
    "glue_sst2": ({"sentence": "A fine film"}, ' is the sentiment of text " a fine film " positive or negative?'),
    "glue_mrpc": ({"sentence1": "A b", "sentence2": "C"}, ' does text1 " a b " and text2 " c " have the same '
                                                            'semantics?'),
    "glue_qqp": ({"question1": "Why?", "question2": "How?"}, ' is question " why? " and question " how? " '
                                                               'equivalent?'),
    "glue_mnli": ({"sentence1": "A", "sentence2": "B"}, ' can text1 " a " imply text2 " b "?'),
    "glue_rte": ({"sentence1": "A", "sentence2": "B"}, ' can text1 " a " imply text2 " b "?'),
    "glue_qnli": ({"question": "Who?", "sentence": "Bob did."}, ' does " bob did. " contain the answer to '
                                                                 'question " who? "?'),
}
WORDS = {"glue_cola": ("no", "yes"), "glue_sst2": ("negative", "positive"), "glue_mrpc": ("no", "yes"),
         "glue_qqp": ("no", "yes"), "glue_mnli": ("maybe", "yes", "no"), "glue_rte": ("no", "yes"),
         "glue_qnli": ("no", "yes")}


@pytest.mark.parametrize("name", GLUE)
def test_template_and_label_words(tok, name):
    fields, text = SOURCES[name]
    task = make(tok, name)
    ex, = task.train_examples(record({**fields, "label": WORDS[name][0]}))
    assert ex["source"] == [BOS, *tok.encode(text), EOS]
    assert LABEL_WORDS[name] == WORDS[name] == tuple(task.candidates)
    assert all(len(ids) == 1 for ids in task.candidate_ids)  # single BPE tokens, as OFA asserts


def test_sentences_keep_punctuation_and_are_cut_in_words(tok):
    task = make(tok, "glue_sst2", max_src_length=3)
    ex, = task.train_examples(record({"sentence": "One,  two! Three four five", "label": "positive"}))
    assert tok.decode(ex["source"][1:-1]) == ' is the sentiment of text " one, two! three " positive or negative?'


# ------------------------------------------------------------------------------------------- src example
def test_one_label_token_at_the_eos_position_and_no_eos(tok):
    task = make(tok, "glue_mnli")
    ex, = task.train_examples(record({"sentence1": "A", "sentence2": "B", "label": "maybe"}))
    src = ex["source"]
    assert ex["prev_output"] == src  # the whole source, eos included, is the decoder input
    assert ex["target"] == [PAD] * (len(src) - 1) + [MAYBE]  # target[i] = prev[i+1]; the label at eos; no eos
    assert ex["constraint"][:-1] == [[]] * (len(src) - 1) and sorted(ex["constraint"][-1]) == sorted([MAYBE, YES, NO])
    assert ex["image"] is None and ex["patch_mask"] is False
    s_len, t_len = task.lengths()
    assert len(src) <= s_len and len(ex["target"]) <= t_len


def test_constraint_mask_restricts_the_loss_to_the_label_words(tok):
    task = make(tok, "glue_sst2")
    examples = [task.train_examples(record({"sentence": s, "label": w}, str(i)))[0]
                for i, (s, w) in enumerate([("good", "positive"), ("a bad long film", "negative")])]
    group = collate(examples, "glue_sst2", task.lengths(), 16, len(tok))
    masks, target = group["constraint_masks"], group["target"]
    for row, ex in enumerate(examples):
        last = len(ex["target"]) - 1
        assert masks[row, last].nonzero().flatten().tolist() == sorted([POSITIVE, NEGATIVE])
        assert (target[row] != PAD).nonzero().flatten().tolist() == [last]
    assert not group["patch_masks"].any()  # no image: the dummy is padding for the encoder
    loss, grad = constrained_loss_gradient(masks, target, group["conf"], epsilon=0.0)
    rows = (target != PAD)
    assert (loss[~rows] == 0).all() and (loss[rows] > 0).all()
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[[POSITIVE, NEGATIVE]] = False
    assert grad[rows][:, outside].abs().max() == 0  # a softmax over the two label words only


# ------------------------------------------------------------------------------------------- prediction
def test_prediction_is_the_masked_argmax_at_the_source_eos(tok):
    """OFA's GLUE evaluation: decoder input = source, logits at its last position masked to the label words."""
    task = make(tok, "glue_mnli")
    model = tiny_model()
    texts = [("a man sleeps", "a man is awake"), ("two dogs run", "animals move"), ("it rains", "it is dry"),
             ("the cat sat", "the cat is on a mat")]
    items = [task.eval_item(record({"sentence1": a, "sentence2": b, "label": "no"}, str(i)))
             for i, (a, b) in enumerate(texts)]
    predicted = task.predict(model, items, device=torch.device("cpu"))
    with torch.no_grad():
        for item, pred in zip(items, predicted):
            src = torch.tensor([item.source])
            enc = model.encoder(src_tokens=src)
            logits = model.decoder(src, enc)[0, -1]
            ids = [c[0] for c in task.candidate_ids]
            assert pred == {"id": item.id, "label": task.candidates[int(logits[ids].argmax())]}
    assert task.result_entry(predicted[0]) == {"id": "0", "label": predicted[0]["label"]}
    assert item.image.numel() == 0  # text only: no image anywhere


def test_glue_needs_src_prompt_and_allcand(tok):
    with pytest.raises(ConfigError, match="allcand"):
        make(tok, "glue_cola", decoding=DecodingSection(inference="beam"))
    with pytest.raises(ConfigError, match="prompt_type=src"):
        make(tok, "glue_cola", prompt_type="prev_output")


# ------------------------------------------------------------------------------------------- metrics
def _items(task, labels):
    return [task.eval_item(record({"sentence": "x", "sentence1": "x", "sentence2": "y", "question1": "a",
                                   "question2": "b", "label": w}, str(i))) for i, w in enumerate(labels)]


def test_cola_mcc_and_mrpc_f1_by_hand(tok):
    refs = ["yes", "yes", "yes", "no", "no", "yes", "no"]
    preds = ["yes", "no", "yes", "no", "yes", "yes", "no"]
    # yes positive: tp 3, fn 1, fp 1, tn 2
    tp, fn, fp, tn = 3, 1, 1, 2
    mcc = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    cola = make(tok, "glue_cola")
    items = _items(cola, refs)
    got = cola.score([{"id": it.id, "label": p} for it, p in zip(items, preds)], items)
    assert got == {"mcc": pytest.approx(mcc), "accuracy": pytest.approx(5 / 7)}
    assert cola.main_metric == "mcc" and cola.metrics == ("mcc", "accuracy")
    for name in ("glue_mrpc", "glue_qqp"):
        task = make(tok, name)
        items = _items(task, refs)
        got = task.score([{"id": it.id, "label": p} for it, p in zip(items, preds)], items)
        assert got == {"accuracy": pytest.approx(5 / 7), "f1": pytest.approx(2 * tp / (2 * tp + fp + fn))}
        assert task.main_metric == "accuracy"
    # all-"no" predictions: no positive prediction, MCC's denominator vanishes -> 0
    got = cola.score([{"id": it.id, "label": "no"} for it in items], items)
    assert got["mcc"] == 0.0


def test_the_other_tasks_report_accuracy(tok):
    for name in ("glue_sst2", "glue_mnli", "glue_rte", "glue_qnli"):
        task = make(tok, name)
        assert task.metrics == ("accuracy",)


# ------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("name", GLUE)
def test_every_format_converts_and_builds(tmp_path, tok, name):
    from ofa_scale.data.sample_text_tasks import task_rows

    rows = task_rows(name, "train", 6, seed=1)
    records = shard_records(tmp_path, name, rows)
    task = make(tok, name)
    for i, (r, row) in enumerate(zip(records, rows)):
        assert r["image"] is None and r["meta"]["uniq_id"] == str(i + 1)  # no id column: the line number
        ex, = task.train_examples(r)
        item = task.eval_item(r)
        assert item.id == str(i + 1) and item.reference["label"] in LABEL_WORDS[name]
        assert tok.decode([ex["target"][-1]]).strip() == item.reference["label"]
    assert name in ROWS  # `ofa-preprocess sample` writes every GLUE format

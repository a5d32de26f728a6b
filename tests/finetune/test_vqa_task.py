"""The VQA task module (spec §7.2, §6.1, §6.3): builder tokens, trie-constrained loss, shards, prediction, score."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import ConfigError, UserError
from ofa_scale.finetune import closed_set
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.task import make_task
from ofa_scale.finetune.vqa import VQATask
from ofa_scale.model.generate import score_candidates
from ofa_scale.utils.trie import Trie

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from closed_set_helpers import (collate, constrained_loss_gradient, jpeg_b64, shard_records,  # noqa: E402
                                smoothed_loss, tiny_model)
from test_generate import biased_towards  # noqa: E402

BOS, PAD, EOS = 0, 1, 2
ANSWERS = ["yes", "no", "2", "red", "red and white"]


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


@pytest.fixture
def answers_file(tmp_path):
    path = tmp_path / "answers.txt"
    path.write_text("".join(a + "\n" for a in ANSWERS))
    return path


def make(tok, answers_file, **kw) -> VQATask:
    fields = dict(name="vqa", answers=str(answers_file), prompt_type="prev_output", add_object=True,
                  image_size=32, max_object_length=30)
    fields.update(kw)
    return make_task(TaskSection(**fields), tok)


def record(question="What color is the bus", answers=None, objects=("bus", "tree", "sky"), qid="262148000"):
    answers = answers or [{"answer": "red", "conf": 0.6}, {"answer": "red and white", "conf": 1.0}]
    return {"key": qid, "meta": {"uniq_id": qid, "image_id": "img", "question": question, "answers": answers,
                                 "objects": list(objects)},
            "image": Image.new("RGB", (40, 30), (200, 10, 10))}


# ------------------------------------------------------------------------------------------- builder tokens
def test_literal_tokens_hand_checked(tok, tmp_path):
    """Spec §3's verified ids: ' what is the image in the middle part?' and ' yes' = 4420, ' no' = 117,
    ' maybe' = 2085; no objects; question lower-cased and '?' appended."""
    path = tmp_path / "yn.txt"
    path.write_text("yes\nno\nmaybe\n")
    task = make(tok, path, add_object=False)
    ex, = task.train_examples(record("What is the image in the middle part", [{"answer": "yes", "conf": 0.9}]))
    prompt = [0, 99, 16, 5, 2274, 11, 5, 1692, 233, 116]
    assert ex["source"] == prompt + [2]
    assert ex["prev_output"] == prompt + [4420]
    assert ex["target"] == [1] * 9 + [4420, 2]
    assert ex["constraint"] == [[]] * 9 + [[4420, 117, 2085], [2]]
    assert ex["conf"] == 0.9 and ex["task"] == "vqa" and ex["patch_mask"] is True
    assert ex["image"].shape == (3, 32, 32) and ex["image"].dtype == torch.uint8


def test_prev_output_tokens_with_objects_and_trie(tok, answers_file):
    task = make(tok, answers_file, max_object_length=2)
    ex, = task.train_examples(record())
    question = tok.encode(" what color is the bus?")
    objects = tok.encode(" object: bus tree")  # the first max_object_length=2 tags
    answer = tok.encode(" red and white")  # the highest-confidence answer
    assert len(answer) == 3
    source = [BOS] + question + objects + [EOS]
    assert ex["source"] == source
    assert ex["prev_output"] == source[:-1] + answer
    assert ex["target"] == [PAD] * (len(source) - 2) + answer + [EOS]
    assert ex["conf"] == 1.0
    cands = [tok.encode(" " + a) for a in ANSWERS]
    first = list(dict.fromkeys(c[0] for c in cands))  # trie children in insertion order
    red_next = [c[1] if len(c) > 1 else EOS for c in cands if c[0] == answer[0]]
    assert ex["constraint"] == [[]] * (len(source) - 2) + [first, red_next, [answer[2]], [EOS]]
    assert EOS in red_next and answer[1] in red_next  # "red" ends or continues
    assert len(ex["constraint"]) == len(ex["target"]) == len(ex["prev_output"])


def test_prompt_types_none_and_src(tok, answers_file):
    ans = tok.encode(" red and white")
    none = make(tok, answers_file, prompt_type="none")
    ex, = none.train_examples(record())
    assert ex["prev_output"] == [BOS] + ans and ex["target"] == ans + [EOS]
    assert len(ex["constraint"]) == len(ans) + 1 and ex["constraint"][-1] == [EOS]
    assert none.eval_item(record()).decoder_prompt == [BOS]
    src = make(tok, answers_file, prompt_type="src")
    ex, = src.train_examples(record())
    assert ex["prev_output"] == ex["source"] + ans
    assert ex["target"] == [PAD] * (len(ex["source"]) - 1) + ans + [EOS]
    assert src.eval_item(record()).decoder_prompt == ex["source"]


def test_question_words_objects_and_question_mark(tok, answers_file):
    task = make(tok, answers_file, max_src_length=3, add_object=False)
    ex, = task.train_examples(record("-Is it   red? really"))
    assert ex["source"] == [BOS] + tok.encode(" is it red?") + [EOS]  # 3 words; '?' already there
    ex, = make(tok, answers_file, add_object=True).train_examples(record(objects=()))
    assert ex["source"] == [BOS] + tok.encode(" what color is the bus?") + tok.encode(" object: ") + [EOS]  # as OFA


def test_source_cut_to_budget_keeps_prompt_and_answer(tok, answers_file):
    task = make(tok, answers_file, extra={"source_length": 8})
    assert task.lengths() == (8, 7 + 3)  # prompt source[:-1] + the longest candidate (3 tokens)
    ex, = task.train_examples(record())
    assert len(ex["source"]) == 8 and ex["source"][-1] == EOS
    assert ex["prev_output"][:7] == ex["source"][:7] and len(ex["target"]) <= task.lengths()[1]
    assert task.skipped["source_truncated"] == 1
    with pytest.raises(ConfigError, match="task.extra.source_length"):
        make(tok, answers_file, extra={"source_length": 3})


def test_answer_outside_candidates_is_skipped_and_counted(tok, answers_file):
    task = make(tok, answers_file)
    assert task.train_examples(record(answers=[{"answer": "purple", "conf": 1.0}])) == []
    assert task.train_examples(record(answers=[{"answer": "red and", "conf": 1.0}])) == []  # a prefix only
    assert task.skipped["answer_not_in_candidates"] == 2
    open_ended = make(tok, answers_file, constrained_training=False)
    ex, = open_ended.train_examples(record(answers=[{"answer": "purple", "conf": 1.0}]))
    assert "constraint" not in ex and ex["target"][-2:] == tok.encode(" purple") + [EOS]


def test_missing_candidate_file_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError, match="task.answers is not set"):
        make_task(TaskSection(name="vqa", answers=None), tok)
    with pytest.raises(UserError, match="does not exist"):
        make_task(TaskSection(name="vqa", answers=str(tmp_path / "x.txt")), tok)
    # open-ended training with beam inference needs no candidates (OFA's --unconstrained-training)
    make_task(TaskSection(name="vqa", constrained_training=False, decoding=DecodingSection(inference="beam")), tok)


# ------------------------------------------------------------------------------ trie-constrained loss
def test_constrained_loss_puts_no_mass_outside_the_trie_smoothing_included(tok, answers_file):
    task = make(tok, answers_file, extra={"source_length": 24})
    records = [record(), record(answers=[{"answer": "yes", "conf": 0.3}], question="is it?")]
    examples = [ex for r in records for ex in task.train_examples(r)]
    batch = collate(examples, "vqa", task.lengths(), 32, len(tok))
    masks, target, conf = batch["constraint_masks"], batch["target"], batch["conf"]
    assert conf.tolist() == pytest.approx([1.0, 0.3])
    loss, grad = constrained_loss_gradient(masks, target, conf)
    assert torch.isfinite(loss).all()
    valid = target != PAD
    # no gradient (no probability, no smoothing mass) on any token outside the allowed set
    assert float(grad[valid][~masks[valid]].abs().max()) == 0.0
    assert float(grad[~valid].abs().max()) == 0.0  # prompt positions do not reach the loss
    # ... and the allowed tokens of a multi-choice position do get it (the test can fail)
    first = (valid & (masks.sum(-1) > 1)).nonzero()[0].tolist()
    assert masks[first[0], first[1]].sum() == 4 and float(grad[first[0], first[1]][masks[first[0], first[1]]]
                                                           .abs().min()) > 0
    # the loss value is spec §6.1's formula with softmax and smoothing over the allowed set only
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(*masks.shape, generator=g)
    b, t = first
    expected = smoothed_loss(logits[b, t], masks[b, t], int(target[b, t]), 0.1) * float(conf[b])
    assert float(loss[b, t]) == pytest.approx(expected, rel=1e-5)


# -------------------------------------------------------------------------------------------- shards
def vqa_rows():
    return [
        ["100", "img1", "What is on the table", "1.0|!+red&&0.3|!+no", "table&&cup", jpeg_b64(48, 40, 1)],
        ["101", "img2", "is it sunny?", "0.6|!+yes&&0.9|!+no", "sky", jpeg_b64(40, 48, 2)],
        ["102", "img1", "how many cups", "1.0|!+2", "", jpeg_b64(48, 40, 3)],
        ["q103", "img3", "what color", "1.0|!+red and white", "bus&&tree", jpeg_b64(36, 36, 4)],
    ]


def test_records_read_back_from_real_shards(tok, answers_file, tmp_path):
    records = shard_records(tmp_path, "vqa", vqa_rows())
    assert [r["meta"]["uniq_id"] for r in records] == ["100", "101", "102", "q103"]
    task = pickle.loads(pickle.dumps(make(tok, answers_file)))  # as the loader's workers receive it
    exs = [task.train_examples(r)[0] for r in records]
    assert exs[0]["source"] == [BOS] + tok.encode(" what is on the table?") + tok.encode(" object: table cup") + [EOS]
    assert exs[1]["target"][-2:] == tok.encode(" no") + [EOS] and exs[1]["conf"] == 0.9
    assert exs[2]["source"] == [BOS] + tok.encode(" how many cups?") + tok.encode(" object: ") + [EOS]
    items = [task.eval_item(r) for r in records]
    assert [i.id for i in items] == [100, 101, 102, "q103"]
    assert items[1].reference == {"answers": {"yes": 0.6, "no": 0.9}}
    assert items[0].decoder_prompt == exs[0]["source"][:-1]
    assert items[0].image_size == (48, 40) and items[0].image.shape == (3, 32, 32)


# ------------------------------------------------------------------------------------------ prediction
@pytest.fixture(scope="module")
def model():
    return tiny_model()


def items_for(task, n=3):
    recs = [record(question=q, qid=str(200 + i), answers=[{"answer": "yes", "conf": 1.0},
                                                          {"answer": "purple", "conf": 0.9}])
            for i, q in enumerate(["is it red?", "what is it", "how many dogs are there"][:n])]
    for i, r in enumerate(recs):
        r["image"] = Image.new("RGB", (40, 30), (40 * i, 255 - 60 * i, 90))
    return [task.eval_item(r) for r in recs]


@pytest.mark.parametrize("favourite", ["2", "red"])
def test_allcand_and_beam_predict_only_candidates_and_agree(tok, answers_file, model, favourite):
    allcand = make(tok, answers_file, decoding=DecodingSection(inference="allcand", batch_size=2,
                                                                candidate_chunk=3))
    beam = make(tok, answers_file, decoding=DecodingSection(inference="beam", beam=5, unnormalized=True,
                                                             batch_size=2))
    items = items_for(allcand)
    first = tok.encode(" " + favourite)[0]
    # the decoder is pulled towards one answer's first token, so the answers differ between runs of this test
    with biased_towards(model, first, strength=10.0):
        a = allcand.predict(model, items, device=torch.device("cpu"))
        b = beam.predict(model, items, device=torch.device("cpu"))
        trie = Trie.from_answers([tok.encode(" " + c) for c in ANSWERS])
        for item, pred in zip(items, a):  # the argmax of every candidate's score, one sample at a time
            one = {"src_tokens": torch.tensor([item.source]), "patch_images": item.image[None],
                   "patch_masks": torch.tensor([True])}
            scores = score_candidates(model, one, [tok.encode(" " + c) for c in ANSWERS],
                                      decoder_prompts=[item.decoder_prompt], constraint_trie=trie)
            assert pred["answer"] == ANSWERS[int(scores.argmax())]
    assert [p["id"] for p in a] == [200, 201, 202]
    assert all(p["answer"] in ANSWERS for p in a + b)  # never "purple", a reference answer outside the file
    assert all(tok.encode(" " + p["answer"])[0] == first for p in a)
    # beam 5 over 5 candidates, unnormalised, is exhaustive: it finds the all-candidate argmax
    assert [p["answer"] for p in b] == [p["answer"] for p in a]
    results = json.loads(json.dumps([allcand.result_entry(p) for p in a]))
    assert all(type(r["question_id"]) is int and type(r["answer"]) is str for r in results)
    assert set(results[0]) == {"question_id", "answer"}


def test_open_ended_beam_decodes_without_candidates(tok, model):
    task = make_task(TaskSection(name="vqa", prompt_type="prev_output", image_size=32, constrained_training=False,
                                 max_tgt_length=3, decoding=DecodingSection(inference="beam", beam=2)), tok)
    preds = task.predict(model, items_for(task, 2), device=torch.device("cpu"))
    assert [p["id"] for p in preds] == [200, 201] and all(isinstance(p["answer"], str) for p in preds)


def test_lockstep_runs_empty_batches_until_every_rank_is_done(tok, answers_file, model, monkeypatch):
    rows, passed = [], []

    def fake(model, batch, candidates, **kw):
        rows.append(batch["src_tokens"].shape[0])
        passed.append(kw.get("lockstep"))
        return torch.zeros(rows[-1], len(candidates))

    monkeypatch.setattr(closed_set, "score_candidates", fake)
    task = make(tok, answers_file, decoding=DecodingSection(inference="allcand", batch_size=2))
    items = items_for(task)  # 3 items: batches of 2 and 1
    calls = []

    def lockstep(done):  # another rank holds two more batches than this one
        calls.append(done)
        return sum(calls) > 2

    preds = task.predict(model, items, device=torch.device("cpu"), lockstep=lockstep)
    assert len(preds) == 3 and calls == [False, False, True, True, True]
    assert rows == [2, 1, 0, 0] and passed == [lockstep] * 4
    rows.clear(), passed.clear()
    task.predict(model, items, device=torch.device("cpu"))
    assert rows == [2, 1] and passed == [None, None]


@pytest.mark.parametrize("inference", ["allcand", "beam"])
def test_empty_batches_under_lockstep_run_the_model(tok, answers_file, model, inference):
    """A rank without items still runs forwards while the others work (ofa_scale.model.generate's lockstep)."""
    task = make(tok, answers_file, decoding=DecodingSection(inference=inference, batch_size=2))
    calls = []
    forwards = []
    handle = model.decoder.register_forward_hook(lambda *a: forwards.append(1))
    try:
        preds = task.predict(model, [], device=torch.device("cpu"),
                             lockstep=lambda done: calls.append(done) or len(calls) > 3)
    finally:
        handle.remove()
    assert preds == [] and forwards and calls[0] is True  # this rank had nothing from the start


# ---------------------------------------------------------------------------------------------- score
def test_vqa_score_is_the_mean_reference_confidence(tok, answers_file):
    task = make(tok, answers_file)
    items = items_for(task, 2)  # references: yes 1.0, purple 0.9
    preds = [{"id": 200, "answer": "purple"}, {"id": 201, "answer": "no"}]
    assert task.score(preds, items) == {"vqa_score": pytest.approx(0.45)}
    with pytest.raises(UserError):
        task.score(preds[::-1], items)
    assert task.main_metric == "vqa_score"

"""The Gigaword task module (spec §7.7): prompt and text preparation, noise on the decoder input only, beam
prediction without an image, ROUGE on fix_tokenization'ed hypotheses against raw lower-cased references."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ofa_scale.data.sample_text_tasks import task_rows
from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import ConfigError
from ofa_scale.evaluation.metrics.gigaword import fix_tokenization, prepare_reference, prepare_summary, rouge_f1
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.gigaword import add_noise
from ofa_scale.finetune.task import make_task

sys.path.insert(0, str(Path(__file__).parent))
from closed_set_helpers import collate, tiny_model  # noqa: E402
from tsv_shards import shard_records  # noqa: E402

BOS, PAD, EOS = 0, 1, 2
OFA_DECODING = DecodingSection(inference="beam", beam=6, lenpen=0.7, max_len_a=0.0, max_len_b=32,
                               no_repeat_ngram_size=3)


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


def make(tok, **kw):
    fields = dict(name="gigaword", image_size=16, max_src_length=512, max_tgt_length=64, decoding=OFA_DECODING)
    fields.update(kw)
    return make_task(TaskSection(**fields), tok)


def record(article="Police in <unk> ARRESTED 3 men - officials said.", headline="Police arrest # men in <unk>",
           uid="1", seed=0):
    return {"key": uid, "meta": {"uniq_id": uid, "source": article, "target": headline}, "image": None,
            "seed": seed}


def test_prompt_and_targets_as_ofa(tok):
    ex, = make(tok).train_examples(record())
    # pre_caption: lower-case, '-' -> ' ', whitespace collapsed; <unk> -> unk
    article = "police in unk arrested 3 men officials said."
    assert ex["source"] == [BOS, *tok.encode(f' what is the summary of article " {article} "?'), EOS]
    head = tok.encode("police arrest # men in unk")  # no leading space, as OFA encodes the target
    assert ex["target"] == head + [EOS] and ex["prev_output"] == [BOS, *head]  # noise_ratio 0: clean input
    assert ex["image"] is None and ex["patch_mask"] is False and ex["task"] == "gigaword"


def test_source_is_cut_to_max_src_length_tokens(tok):
    task = make(tok, max_src_length=10)
    ex, = task.train_examples(record(article="word " * 50))
    assert len(ex["source"]) == 12 and ex["source"][-1] == EOS and task.lengths()[0] == 12


def test_noise_replaces_decoder_input_tokens_only(tok):
    task = make(tok, extra={"noise_ratio": 0.2})
    clean, = make(tok).train_examples(record(headline="a b c d e f g h i j k l m n o p q r s t " * 3))
    replaced = total = 0
    for seed in range(40):
        ex, = task.train_examples(record(headline="a b c d e f g h i j k l m n o p q r s t " * 3, seed=seed))
        assert ex["target"] == clean["target"] and ex["source"] == clean["source"]  # the target stays clean
        assert ex["prev_output"][0] == BOS and len(ex["prev_output"]) == len(clean["prev_output"])
        changed = [(a, b) for a, b in zip(ex["prev_output"][1:], clean["prev_output"][1:]) if a != b]
        assert all(4 <= a < tok.code_offset for a, _ in changed)  # text tokens, OFA's [4, 50265)
        replaced += len(changed)
        total += len(clean["prev_output"]) - 1
        again, = task.train_examples(record(headline="a b c d e f g h i j k l m n o p q r s t " * 3, seed=seed))
        assert again == ex  # the record's seed fixes its noise
    assert 0.15 < replaced / total < 0.25
    # OFA's add_noise_to_tgt draws every position independently
    import random
    rng = random.Random(0)
    assert add_noise(list(range(10)), 0.0, 100, rng) == list(range(10))
    assert all(4 <= t < 6 for t in add_noise([50] * 20, 0.999, 6, rng))


def test_bad_noise_ratio_is_a_config_error(tok):
    with pytest.raises(ConfigError, match="noise_ratio"):
        make(tok, extra={"noise_ratio": 1.5})


def test_text_only_batch_and_prediction(tok):
    task = make(tok, max_src_length=40, max_tgt_length=8, decoding=DecodingSection(
        inference="beam", beam=3, lenpen=0.7, max_len_b=5, no_repeat_ngram_size=3, batch_size=2))
    examples = [task.train_examples(record(uid=str(i), seed=i))[0] for i in range(2)]
    group = collate(examples, "gigaword", task.lengths(), 16, len(tok))
    assert not group["patch_masks"].any()
    items = [task.eval_item(record(uid=str(i))) for i in range(3)]
    assert all(it.image.numel() == 0 and it.decoder_prompt == [BOS] for it in items)
    assert items[0].reference == {"summary": "Police arrest # men in <unk>"}  # raw: scoring only lower-cases
    preds = task.predict(tiny_model(), items, device=torch.device("cpu"))
    assert [p["id"] for p in preds] == ["0", "1", "2"] and all(isinstance(p["summary"], str) for p in preds)
    assert task.result_entry(preds[0]) == {"id": "0", "summary": preds[0]["summary"]}
    assert set(task.score(preds, items)) == {"rouge1", "rouge2", "rouge_l"} and task.main_metric == "rouge_l"


def test_hypotheses_are_fix_tokenized_and_references_only_lower_cased(tok):
    task = make(tok)
    ref = "Troops Do n't kill 1 -LRB- rebels -RRB-"
    items = [task.eval_item(record(uid="a", headline=ref))]
    # hypothesis: lower-cased, n't re-attached, ( -> -lrb-, 1 -> # (OFA's order: lower-case first)
    hyp = "Troops don ' t kill 1 ( rebels )"
    assert prepare_summary(hyp) == "troops do n't kill # -lrb- rebels -rrb-"
    assert prepare_reference(ref) == "troops do n't kill 1 -lrb- rebels -rrb-"
    got = task.score([{"id": "a", "summary": hyp}], items)
    means, _ = rouge_f1([prepare_summary(hyp)], [prepare_reference(ref)])
    assert got == {"rouge1": means["rouge1"], "rouge2": means["rouge2"], "rouge_l": means["rouge_l"]}
    assert got["rouge1"] < 1.0  # the reference keeps its "1", which the hypothesis' "#" does not match
    # rewriting the reference too (the old behaviour) would have scored a perfect match
    assert rouge_f1([prepare_summary(hyp)], [prepare_summary(ref)])[0]["rouge1"] == 1.0
    assert fix_tokenization("police don ' t say") == "police do n't say"


def test_sample_rows_convert_and_build(tmp_path, tok):
    rows = task_rows("gigaword", "train", 4, seed=2)
    task = make(tok)
    for i, (r, row) in enumerate(zip(shard_records(tmp_path, "gigaword", rows), rows)):
        assert r["meta"]["uniq_id"] == str(i + 1) and r["meta"]["target"] == row[1]
        ex, = task.train_examples(r)
        assert tok.decode(ex["target"][:-1]) == row[1]

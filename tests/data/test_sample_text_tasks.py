"""`ofa-preprocess sample`'s text TSVs (data/sample_text_tasks.py): every row parses in its converter format,
labels follow from the text (checked by independent rules here), label values are balanced, held-out splits
differ from training, and the bytes are deterministic."""

from __future__ import annotations

from collections import Counter

import pytest

from ofa_scale.cli.preprocess import main as preprocess
from ofa_scale.data.sample_text_tasks import (ACTIONS, ATTRIBUTES, NEGATIVE, POSITIVE, ROWS, SYNONYMS, task_rows,
                                              write_text_corpus)
from ofa_scale.data.tsv_formats import get_format
from ofa_scale.errors import UserError

N = 60


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_rows_parse_and_labels_are_balanced(fmt):
    rows = task_rows(fmt, "train", N, seed=0)
    parsed = [get_format(fmt).parse(r, i + 1)[1] for i, r in enumerate(rows)]
    if fmt != "gigaword":
        counts = Counter(p["label"] for p in parsed)
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) >= 2


def test_sst2_label_is_the_sentiment_word():
    for sentence, label in task_rows("glue_sst2", "train", N, seed=1):
        words = set(sentence.split())
        assert (label == "1") == bool(words & set(POSITIVE)) and (label == "0") == bool(words & set(NEGATIVE))


def test_cola_label_is_the_word_order():
    for _, sentence, label in task_rows("glue_cola", "train", N, seed=1):
        w = sentence.split()
        grammatical = len(w) == 6 and w[0] == w[3] == "the" and w[2] in ACTIONS and w[5] == "."
        assert grammatical == (label == "1")


def _content(sentence: str) -> set[str]:
    back = {v: k for k, v in SYNONYMS.items()}
    return {back.get(w, w) for w in sentence.split()} - {"the", "yesterday", ".", "was", "by"}


def test_mrpc_paraphrase_means_the_same_content_words():
    for s1, s2, label in task_rows("glue_mrpc", "train", N, seed=1):
        assert (_content(s1) == _content(s2)) == (label == "1")


def test_qqp_duplicates_ask_for_the_same_attribute_of_the_same_thing():
    for *_, q1, q2, label in task_rows("glue_qqp", "train", N, seed=1):
        assert q2.startswith("do you know ") and (q2[len("do you know "):] == q1) == (label == "1")


def test_nli_labels_follow_the_premise():
    def relation(premise: str, hypothesis: str) -> str:
        person, room = premise.split()[1], premise.split()[-2]
        h = hypothesis.split()
        if h[-2] == room and h[1] == person and len(h) == 7:
            return "entailment"
        return "neutral" if room in h else "contradiction"

    mnli = {"0": "neutral", "1": "entailment", "2": "contradiction"}
    for premise, hypothesis, label in task_rows("glue_mnli", "train", N, seed=1):
        assert relation(premise, hypothesis) == mnli[label]
    for _, premise, hypothesis, label in task_rows("glue_rte", "train", N, seed=1):
        assert (relation(premise, hypothesis) == "entailment") == (label == "entailment")


def test_qnli_sentence_answers_iff_it_states_the_asked_attribute():
    asks = {q: a for a, (q, _) in ATTRIBUTES.items()}
    states = {"height": "metres tall", "age": "years old", "owner": "owned by", "colour": "painted"}
    for _, question, sentence, label in task_rows("glue_qnli", "train", N, seed=1):
        attr = next(a for q, a in asks.items() if question.startswith(q))
        assert (states[attr] in sentence) == (label == "entailment")


def test_gigaword_headline_is_the_active_voice_of_the_article():
    for article, headline in task_rows("gigaword", "train", N, seed=1):
        words = article.split()
        i = words.index("was")
        obj, place, past, actor = words[i - 3], words[i - 1], words[i + 1], words[i + 3]
        assert headline == f"{actor} {ACTIONS[past]} {obj} in {place}"
        assert not set(headline.split()) & set(words[:3])  # the lead words carry none of the headline


def test_corpus_files_are_deterministic_and_splits_differ(tmp_path):
    a = write_text_corpus(tmp_path / "a", rows=20, eval_rows=8, seed=5)
    b = write_text_corpus(tmp_path / "b", rows=20, eval_rows=8, seed=5)
    assert set(a) == {f"{f}_{s}.tsv" for f in ROWS for s in ("train", "val", "test")}
    assert all(a[n].read_bytes() == b[n].read_bytes() for n in a)
    for fmt in ROWS:
        train = set(a[f"{fmt}_train.tsv"].read_text().splitlines())
        assert train != set(a[f"{fmt}_test.tsv"].read_text().splitlines())
    with pytest.raises(UserError, match="--text-rows"):
        write_text_corpus(tmp_path / "c", rows=0, eval_rows=8)


def test_sample_command_writes_the_text_tsvs(tmp_path, capsys):
    assert preprocess(["sample", "--out", str(tmp_path), "--rows", "1", "--finetune-images", "0", "--text-rows", "4",
                       "--text-eval-rows", "2"]) == 0
    assert len((tmp_path / "text" / "glue_qqp_train.tsv").read_text().splitlines()) == 4
    assert "text/gigaword_test.tsv: 2 rows" in capsys.readouterr().out

"""VQA, grounding, classification/GLUE and Gigaword metrics on hand-computed cases."""

import math

import pytest

from ofa_scale.evaluation.labels import GLUE_WORDS, SNLI_VE_WORDS, label_word
from ofa_scale.evaluation.metrics.classification import accuracy, confusion, f1_positive, matthews_corrcoef
from ofa_scale.evaluation.metrics.gigaword import fix_tokenization, prepare_summary, rouge_f1
from ofa_scale.evaluation.metrics.grounding import bins_to_box, box_iou, grounding_hit, tokens_to_box
from ofa_scale.evaluation.metrics.vqa import vqa_score


def test_vqa_soft_score_is_the_stored_confidence():
    answers = [{"answer": "two", "conf": 1.0}, {"answer": "2", "conf": 0.6}, {"answer": "three", "conf": 0.3}]
    assert vqa_score("2", answers) == 0.6
    assert vqa_score(" two ", answers) == 1.0
    assert vqa_score("four", answers) == 0.0
    assert vqa_score("yes", {"yes": 0.9}) == 0.9


def test_bins_to_box_undoes_the_512_squash():
    # bin 999 is the far edge of the 512x512 input; x scaled by W/512, y by H/512.
    assert bins_to_box([0, 0, 999, 999], width=640, height=480) == pytest.approx([0, 0, 640, 480])
    x = 250 / 999 * 512
    assert bins_to_box([250, 500, 250, 500], 1024, 256) == pytest.approx(
        [x * 2, 500 / 999 * 512 / 2, x * 2, 500 / 999 * 512 / 2])
    bin_offset = 58457
    assert tokens_to_box([bin_offset + 10, bin_offset + 20, bin_offset + 30, bin_offset + 40, 2], bin_offset,
                         512, 512) == pytest.approx([10 / 999 * 512, 20 / 999 * 512, 30 / 999 * 512, 40 / 999 * 512])


def test_iou_convention_and_acc_at_half():
    iou, w, h = box_iou([0, 0, 10, 10], [5, 0, 15, 10])
    assert (w, h) == (5, 10) and iou == pytest.approx(50 / (100 + 100 - 50 + 1e-6))
    assert grounding_hit([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert grounding_hit([0, 0, 10, 10], [5, 0, 15, 10]) == 0.0        # IoU 1/3
    # Two inverted boxes have positive "IoU" (negative/negative) but no positive-size intersection -> miss.
    assert box_iou([10, 10, 0, 0], [10, 10, 0, 0])[0] > 0.5
    assert grounding_hit([10, 10, 0, 0], [10, 10, 0, 0]) == 0.0


def test_iou_threshold_boundary():
    # IoU = 100 / (100 + 200 - 100 + 1e-6) is just under 0.5 because of the epsilon -> miss;
    # a slightly larger overlap passes.
    assert grounding_hit([0, 0, 10, 10], [0, 0, 10, 20]) == 0.0
    assert grounding_hit([0, 0, 10, 10.1], [0, 0, 10, 20]) == 1.0


def test_accuracy_mcc_f1_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    refs = ["yes", "no", "no", "yes", "yes", "no"]
    assert confusion(preds, refs, "yes") == (2, 1, 1, 2)
    assert accuracy(preds, refs) == pytest.approx(4 / 6)
    assert matthews_corrcoef(preds, refs) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert f1_positive(preds, refs) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(["yes", "yes"], ["yes", "no"]) == 0.0   # a marginal is empty
    assert f1_positive(["no"], ["no"]) == 0.0


def test_label_words():
    assert label_word(0, GLUE_WORDS["cola"]) == "no" and label_word("1", GLUE_WORDS["sst2"]) == "positive"
    assert label_word("contradiction", SNLI_VE_WORDS) == "no" and label_word("maybe", SNLI_VE_WORDS) == "maybe"
    assert label_word("not_entailment", GLUE_WORDS["rte"]) == "no"
    assert label_word(2, GLUE_WORDS["mnli"]) == "no"


@pytest.mark.parametrize("raw, fixed", [
    ('he said " hello " ( today )', "he said `` hello '' -lrb- today -rrb-"),
    ("they don ' t know it ' s here", "they do n't know it 's here"),
    ("$ 3 , 000 and 3 . 5 pct", "$ 3,000 and 3.5 pct"),
    ("the U . N . said", "the U.N. said"),
    ("the U . S . A . team", "the U.S.A. team"),
    ("plan B . then", "plan B . then"),  # a lone capital before a full stop is not an abbreviation
    ("a ' quoted ' word [ x ]", "a ` quoted ' word -lsb- x -rsb-"),
])
def test_fix_tokenization(raw, fixed):
    assert fix_tokenization(raw) == fixed


def test_prepare_summary_maps_ones_and_unk():
    assert prepare_summary("Police Kill 1 <unk> in 10 raids") == "police kill # unk in #0 raids"


def test_gigaword_rouge_with_stemming():
    means, per = rouge_f1(["the cats were running"], ["cat runs"])
    # stemming: cats->cat, running->run, runs->run; unigrams hyp {the, cat, were, run}, ref {cat, run}
    assert per["rouge1"][0] == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2))
    assert per["rouge2"][0] == 0.0
    assert means["rouge_l"] == pytest.approx(per["rouge1"][0])


def test_beam_override_applies_to_every_task_and_keeps_task_settings():
    from types import SimpleNamespace

    from ofa_scale.evaluation.generation import decoding_config

    tok = SimpleNamespace(bin_offset=100, num_bins=10)
    assert decoding_config("caption", tok).beam_size == 5
    greedy = decoding_config("caption", tok, beam_size=1)
    assert greedy.beam_size == 1 and greedy.no_repeat_ngram_size == 3 and greedy.max_len_b == 16
    grounding = decoding_config("grounding", tok, beam_size=2)
    assert grounding.beam_size == 2 and grounding.constraint_range == (100, 110)

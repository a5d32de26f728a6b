"""Caption metrics: pycocoevalcap's scorers wired in COCOEvalCap's order (hand-computed cases and COCOEvalCap
itself as the references), and the hand-written CIDEr-D equal to pycocoevalcap's `Cider` (which is CIDEr-D)."""

import gzip
import json
import math
import pickle
import random
from collections import defaultdict

import numpy as np
import pytest

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.caption import coco_caption_metrics, score_captions
from ofa_scale.evaluation.metrics.caption_text import prepare_caption, ptb_tokenize, scst_sentence, split_references
from ofa_scale.evaluation.metrics.cider import CiderD, DocumentFrequencies


def random_corpus(seed: int, size: int):
    rng = random.Random(seed)
    vocab = "a man dog on the street red car with sitting of two people riding bike".split()

    def sentence():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))

    hyps = [sentence() for _ in range(size)]
    refs = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(size)]
    return hyps, refs


def test_bleu_and_rouge_hand_computed_through_the_library():
    # p1..p3 = 1, no 4-grams (0/0 -> 1e-15/1e-9), brevity penalty exp(1 - 4/3): 3 words vs the closest ref (4).
    s = score_captions(["the cat sat"], [["the cat sat on", "a dog is here now"]]).metrics
    bp = math.exp(1 - 4 / 3)
    assert s["bleu1"] == pytest.approx(bp) and s["bleu3"] == pytest.approx(bp)
    assert s["bleu4"] == pytest.approx(bp * (1e-15 / 1e-9) ** 0.25)
    # clipping: "the the the" matches "the" at most twice (max count over references)
    assert score_captions(["the the the"], [["the cat the", "the"]]).metrics["bleu1"] == pytest.approx(2 / 3)
    # closest reference length, ties to the shorter: refs of 2 and 4 words for 3 -> 2, no penalty
    assert score_captions(["a b c"], [["a b", "a b c d"]]).metrics["bleu1"] == pytest.approx(1.0)
    # ROUGE-L, beta 1.2: LCS 3 of 4 hypothesis / 5 reference words ...
    p, r, beta = 3 / 4, 3 / 5, 1.2
    assert score_captions(["a b c d"], [["a c d e f"]]).metrics["rouge_l"] == pytest.approx(
        (1 + beta**2) * p * r / (r + beta**2 * p))
    # ... and best precision and best recall taken from different references
    assert score_captions(["a b"], [["a b c d", "a x"]]).metrics["rouge_l"] == pytest.approx(
        (1 + beta**2) * 1.0 * 0.5 / (0.5 + beta**2 * 1.0))


def test_score_captions_passes_each_hypothesis_its_own_references_in_order():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = random_corpus(0, 40)
    raw_refs = [[r.upper() + "." for r in rs] for rs in refs]  # `ofa` preparation lower-cases, drops the '.'
    scores = score_captions(hyps, raw_refs, keys=[f"img{i}" for i in range(40)])
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    assert [scores.metrics[f"bleu{k}"] for k in (1, 2, 3, 4)] == bleu
    np.testing.assert_array_equal(scores.per_sample["bleu4"], bleu_each[3])
    assert (scores.metrics["rouge_l"], scores.metrics["cider"]) == (rouge, cider)
    np.testing.assert_array_equal(scores.per_sample["rouge_l"], rouge_each)
    np.testing.assert_array_equal(scores.per_sample["cider"], cider_each)
    # with cached frequencies CIDEr-D comes from CiderD on the same prepared text
    df = DocumentFrequencies.from_references(refs[:10])
    cached = score_captions(hyps, raw_refs, document_frequencies=df)
    np.testing.assert_array_equal(cached.per_sample["cider"], CiderD(df).score_per_hypothesis(hyps, refs))
    assert cached.metrics["bleu4"] == scores.metrics["bleu4"]


def test_cider_d_equals_pycocoevalcap_cider():
    """pycocoevalcap's `Cider` is CIDEr-D: clipped TF-IDF cosine, Gaussian length penalty (sigma 6, on the bigram
    count), ×10, df from the scored references. Ours with a cache built from those references, and in corpus mode,
    gives the same per-image scores."""
    from pycocoevalcap.cider.cider import Cider

    hyps, refs = random_corpus(1, 60)
    mean, each = Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    cached = CiderD(DocumentFrequencies.from_references(refs)).score_per_hypothesis(hyps, refs)
    np.testing.assert_allclose(cached, each, rtol=0, atol=1e-6)
    np.testing.assert_allclose(CiderD().score_per_hypothesis(hyps, refs), each, rtol=1e-12, atol=1e-12)
    assert cached.mean() == pytest.approx(mean, abs=1e-6)


def test_cider_d_hand_computed():
    # df over 2 documents: a, b, "a b", d once each. Identical 2-word sentences: cosine 1 for orders 1 and 2,
    # 0 for orders 3-4 (no n-grams) -> mean 0.5, x10 = 5. Disjoint sentences score 0.
    np.testing.assert_allclose(CiderD().score_per_hypothesis(["a b", "c"], [["a b"], ["d"]]), [5.0, 0.0])
    # Gaussian length penalty on the bigram count (the reference implementations' convention)
    df = DocumentFrequencies(counts={}, num_documents=3)
    w = math.log(3)
    cos1 = (w * w * 2) / (math.sqrt(4) * w * math.sqrt(2) * w)
    cos2 = (w * w) / (math.sqrt(3) * w * w)
    expected = (cos1 + cos2) * math.exp(-((3 - 1) ** 2) / (2 * 36)) / 4 * 10
    assert CiderD(df).score_per_hypothesis(["x y z w"], [["x y"]])[0] == pytest.approx(expected)


def test_scst_scores_each_beam_hypothesis_in_ofa_reward_form(tmp_path):
    _, refs = random_corpus(2, 20)
    train_refs = [[scst_sentence(r) for r in rs] for rs in refs]
    df = DocumentFrequencies.from_references(train_refs)
    df.save(tmp_path / "df.json.gz")
    scorer = CiderD(tmp_path / "df.json.gz")  # a path is loaded once, at construction
    image_refs = ["A man, riding a bike.", "a man on a bike"]
    beams = ["a man riding a bike", "two dogs", "A man on a bike!"]
    rewards = scorer.score_scst(beams, [image_refs] * 3)
    expected = CiderD(df).score_per_hypothesis([scst_sentence(h) for h in beams],
                                               [[scst_sentence(r) for r in image_refs]] * 3)
    np.testing.assert_array_equal(rewards, expected)
    assert rewards.shape == (3,) and rewards[1] < rewards[0] and rewards[1] < rewards[2]
    # a hypothesis is scored on its own: alone it gets the same value
    assert scorer.score_scst(beams[:1], [image_refs])[0] == rewards[0]
    plain = DocumentFrequencies.from_references([[prepare_caption(r) for r in rs] for rs in refs])
    with pytest.raises(UserError, match="<eos>"):
        CiderD(plain).score_scst(beams, [image_refs] * 3)


@pytest.mark.parametrize("name", ["df.json", "df.json.gz"])
def test_df_cache_round_trip(tmp_path, name):
    _, refs = random_corpus(3, 10)
    df = DocumentFrequencies.from_references(refs)
    df.save(tmp_path / name)
    loaded = DocumentFrequencies.load(tmp_path / name)
    assert loaded.num_documents == df.num_documents and dict(loaded.counts) == dict(df.counts)
    assert not list(tmp_path.glob(".*"))  # written through a temporary file that is renamed away


def test_df_cache_reads_format_version_1(tmp_path):
    """Version 1 stored the n-grams as one JSON object; caches built with it still load."""
    (tmp_path / "v1.json").write_text(json.dumps({"format_version": 1, "kind": "cider-document-frequencies",
                                                  "n": 4, "num_documents": 3,
                                                  "document_frequency": {"a": 2.0, "a b": 1.0}}))
    loaded = DocumentFrequencies.load(tmp_path / "v1.json")
    assert loaded.num_documents == 3 and dict(loaded.counts) == {"a": 2.0, "a b": 1.0}
    (tmp_path / "v9.json").write_text(json.dumps({"format_version": 9, "kind": "cider-document-frequencies"}))
    with pytest.raises(UserError, match="format version"):
        DocumentFrequencies.load(tmp_path / "v9.json")


def test_df_cache_reads_ofa_pickle_and_refuses_code(tmp_path):
    counts = defaultdict(float, {("a",): 2.0, ("a", "b"): 1.0})
    (tmp_path / "words.p").write_bytes(pickle.dumps({"document_frequency": counts, "ref_len": 7}, protocol=2))
    loaded = DocumentFrequencies.load(tmp_path / "words.p")
    assert loaded.num_documents == 7 and loaded.counts["a b"] == 1.0

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.p").write_bytes(pickle.dumps({"document_frequency": Evil(), "ref_len": 1}, protocol=2))
    with pytest.raises(UserError, match="df pickle"):
        DocumentFrequencies.load(tmp_path / "evil.p")
    (tmp_path / "bad.json.gz").write_bytes(gzip.compress(b'{"kind": "other"}'))
    with pytest.raises(UserError, match="cider-df"):
        DocumentFrequencies.load(tmp_path / "bad.json.gz")


def test_caption_text_preparation():
    assert prepare_caption("  A man, riding a horse.  ") == "a man riding a horse"
    assert prepare_caption("Dog's  toy -- red!") == "dogs toy red"
    assert scst_sentence("A bird on a wire.") == "a bird on a wire <eos>"
    assert split_references("a cat&& a dog &&two") == ["a cat", "a dog", "two"]
    assert split_references(["x", "y"]) == ["x", "y"]


def test_ptb_tokenizer_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = ["A man (in red) isn't riding a bike.", 'Two dogs, "playing" -- in the U.S. snow!', "ok"]
    expected = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    assert ptb_tokenize(sentences) == [expected[i][0] for i in range(len(sentences))]


class _NoSpice:
    """COCOEvalCap always runs SPICE, whose first use downloads Stanford models; the protocol leaves it out."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(res)

    def method(self):
        return "SPICE"


class _MeteorInputs:
    """Stands in for METEOR on both sides and records what each is handed: the test checks that the inputs are
    the same (METEOR itself is the library's; a JVM start per side would make this test minutes long on a busy
    machine). The real METEOR runs in test_score_cli's Java test."""

    calls: list = []

    def __init__(self, *args):
        pass

    def compute_score(self, gts, res):
        self.calls.append(([(str(k), v) for k, v in gts.items()], [(str(k), v) for k, v in res.items()]))
        return 0.25, [0.25] * len(res)

    def method(self):
        return "METEOR"


def _our_meteor_inputs(gts, res):
    score, each = _MeteorInputs().compute_score(gts, res)
    return score, np.asarray(each)


def test_coco_caption_metrics_equal_cocoevalcap(monkeypatch):
    """COCOEvalCap on in-memory COCO objects (as OFA's coco_eval.py loads results.json) vs our results-list call:
    same PTB tokenisation of both sides, several references per image, integer image ids, an image without a
    result left out, and each scorer's value passed through unchanged."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    import ofa_scale.evaluation.metrics.meteor as our_meteor

    refs = {391895: ["A man riding his friend's bike.", "a person isn't walking, he's on a bicycle"],
            522418: ["A red square on a table!", "a square that is red", "red square"],
            7: ["Two dogs play in the grass.", "dogs playing outside"],
            8: ["an image without a result"]}
    results = [{"image_id": 7, "caption": "two dogs in the grass"},
               {"image_id": 391895, "caption": "A man rides a friend's bike."},  # PTB: "friend 's"
               {"image_id": 522418, "caption": "a red square"}]
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in refs], "annotations": [
        {"image_id": i, "id": 10 * i + k, "caption": c} for i, cs in refs.items() for k, c in enumerate(cs)]}
    coco.createIndex()
    evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes(results))
    evaluator.params["image_id"] = evaluator.cocoRes.getImgIds()  # coco_eval.py: the images with a result
    _MeteorInputs.calls = []
    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    monkeypatch.setattr(coco_eval, "Meteor", _MeteorInputs)
    monkeypatch.setattr(our_meteor, "meteor", _our_meteor_inputs)
    evaluator.evaluate()
    # references as a JSON object would give them back: string keys
    ours = coco_caption_metrics(results, {str(k): v for k, v in refs.items()})
    assert ours == pytest.approx({"bleu4": evaluator.eval["Bleu_4"], "meteor": evaluator.eval["METEOR"],
                                  "rouge_l": evaluator.eval["ROUGE_L"], "cider": evaluator.eval["CIDEr"]},
                                 rel=1e-12, abs=1e-12)
    coco_inputs, our_inputs = _MeteorInputs.calls
    assert our_inputs == coco_inputs and len(coco_inputs[0]) == 3  # tokenised, same images in the same order
    assert ours["cider"] > 0 and ours["bleu4"] > 0


def test_coco_caption_metrics_refuses_malformed_results():
    refs = {1: ["a cat"], 2: ["a dog"]}
    with pytest.raises(UserError, match="no references"):
        coco_caption_metrics([{"image_id": 3, "caption": "a cat"}], refs)
    with pytest.raises(UserError, match="more than one"):
        coco_caption_metrics([{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}], refs)
    with pytest.raises(UserError, match="'caption': str"):
        coco_caption_metrics([{"image_id": 1, "caption": None}], refs)
    with pytest.raises(UserError, match="twice"):
        coco_caption_metrics([], {1: ["a"], "1": ["b"]})

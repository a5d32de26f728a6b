"""Caption metrics: hand-computed cases, and agreement with pycocoevalcap on the same tokenised input."""

import gzip
import math
import pickle
import random
from collections import defaultdict

import numpy as np
import pytest

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.bleu import bleu
from ofa_scale.evaluation.metrics.caption_text import prepare_caption, ptb_tokenize, scst_sentence, split_references
from ofa_scale.evaluation.metrics.cider import CiderD, DocumentFrequencies
from ofa_scale.evaluation.metrics.rouge_l import lcs_length, rouge_l, rouge_l_sentence


def random_corpus(seed: int, size: int):
    rng = random.Random(seed)
    vocab = "a man dog on the street red car with sitting of two people riding bike".split()

    def sentence():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))

    hyps = [sentence() for _ in range(size)]
    refs = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(size)]
    return hyps, refs


def test_bleu_hand_computed():
    # p1..p3 = 1, no 4-grams (0/0 -> 1e-15/1e-9), brevity penalty exp(1 - 4/3) for 3 words vs 4.
    result = bleu(["the cat sat"], [["the cat sat on", "a dog is here now"]])
    bp = math.exp(1 - 4 / 3)
    assert result.corpus[0] == pytest.approx(bp)
    assert result.corpus[2] == pytest.approx(bp)
    assert result.corpus[3] == pytest.approx(bp * (1e-15 / 1e-9) ** 0.25)
    # clipping: "the the the" matches "the" at most twice (max count over references)
    clipped = bleu(["the the the"], [["the cat the", "the"]])
    assert clipped.corpus[0] == pytest.approx(2 / 3)


def test_bleu_closest_reference_length_prefers_shorter_on_ties():
    # hypothesis of 3 words, references of 2 and 4 words: both 1 away -> the shorter (2) is used, no penalty.
    result = bleu(["a b c"], [["a b", "a b c d"]])
    assert result.corpus[0] == pytest.approx(1.0)


def test_rouge_l_hand_computed():
    assert lcs_length("a c d e f".split(), "a b c d".split()) == 3
    p, r, beta = 3 / 4, 3 / 5, 1.2
    assert rouge_l_sentence("a b c d", ["a c d e f"]) == pytest.approx((1 + beta**2) * p * r / (r + beta**2 * p))
    # best precision and best recall are taken from different references
    assert rouge_l_sentence("a b", ["a b c d", "a x"]) == pytest.approx(
        (1 + beta**2) * 1.0 * 0.5 / (0.5 + beta**2 * 1.0))
    assert rouge_l_sentence("", ["a"]) == 0.0


def test_cider_d_hand_computed():
    # df over 2 documents: a, b, "a b", d once each. Identical 2-word sentences: cosine 1 for orders 1 and 2,
    # 0 for orders 3-4 (no n-grams) -> mean 0.5, x10 = 5. Disjoint sentences score 0.
    scores = CiderD().score(["a b", "c"], [["a b"], ["d"]])
    np.testing.assert_allclose(scores, [5.0, 0.0])
    # Gaussian length penalty: the length is the bigram count (reference implementations' convention).
    df = DocumentFrequencies(counts={}, num_documents=3)
    long_hyp = CiderD(df).score(["x y z w"], [["x y"]])[0]
    # order-1 cosine: ref (x,y) vs hyp (x,y,z,w) with equal idf -> 2/(2*sqrt(2)*...) ; compute directly
    w = math.log(3)
    cos1 = (w * w * 2) / (math.sqrt(4) * w * math.sqrt(2) * w)
    cos2 = (w * w) / (math.sqrt(3) * w * w)
    expected = (cos1 + cos2) * math.exp(-((3 - 1) ** 2) / (2 * 36)) / 4 * 10
    assert long_hyp == pytest.approx(expected)


def test_bleu_rouge_cider_match_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = random_corpus(0, 60)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    ref_bleu, ref_bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    ours = bleu(hyps, refs)
    np.testing.assert_allclose(ours.corpus, ref_bleu, rtol=1e-12)
    np.testing.assert_allclose(ours.per_sentence, np.array(ref_bleu_each).T, rtol=1e-12)
    ref_rouge, ref_rouge_each = Rouge().compute_score(gts, res)
    mean, each = rouge_l(hyps, refs)
    assert mean == pytest.approx(ref_rouge, rel=1e-12)
    np.testing.assert_allclose(each, ref_rouge_each, rtol=1e-12)
    ref_cider, ref_cider_each = Cider().compute_score(gts, res)
    cider_each = CiderD().score(hyps, refs)
    np.testing.assert_allclose(cider_each, ref_cider_each, rtol=1e-10, atol=1e-12)
    assert cider_each.mean() == pytest.approx(ref_cider, rel=1e-10)


def test_cached_df_reproduces_corpus_mode_and_scores_each_beam_hypothesis():
    hyps, refs = random_corpus(1, 20)
    df = DocumentFrequencies.from_references(refs)
    np.testing.assert_allclose(CiderD(df).score(hyps, refs), CiderD().score(hyps, refs))
    # SCST: 3 hypotheses of one image scored against the cache; the scores are independent per hypothesis.
    beam = [hyps[0], hyps[1], refs[0][0]]
    scores = CiderD(df).score(beam, [refs[0]] * 3)
    assert scores.shape == (3,)
    assert scores[0] == pytest.approx(CiderD(df).score([hyps[0]], [refs[0]])[0])
    assert scores[2] > scores[0]  # a hypothesis equal to a reference scores above a random one


@pytest.mark.parametrize("name", ["df.json", "df.json.gz"])
def test_df_cache_round_trip(tmp_path, name):
    _, refs = random_corpus(2, 10)
    df = DocumentFrequencies.from_references(refs)
    df.save(tmp_path / name)
    loaded = DocumentFrequencies.load(tmp_path / name)
    assert loaded.num_documents == df.num_documents and dict(loaded.counts) == dict(df.counts)


def test_df_cache_reads_ofa_pickle_and_refuses_code(tmp_path):
    counts = defaultdict(float, {("a",): 2.0, ("a", "b"): 1.0})
    (tmp_path / "words.p").write_bytes(pickle.dumps({"document_frequency": counts, "ref_len": 7}, protocol=2))
    loaded = DocumentFrequencies.load(tmp_path / "words.p")
    assert loaded.num_documents == 7 and loaded.counts[("a", "b")] == 1.0

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

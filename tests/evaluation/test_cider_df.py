"""`ofa-eval cider-df` from each caption source: one document per image, SCST-form sentences, same cache from a
TSV and from its shards, read back by the SCST scorer."""

import gzip
import json

import numpy as np
import pytest

from ofa_scale.cli.evaluate import main
from ofa_scale.cli.preprocess import main as preprocess
from ofa_scale.evaluation.metrics.caption_text import scst_sentence
from ofa_scale.evaluation.metrics.cider import CiderD, DocumentFrequencies
from tests.finetune.tsv_shards import image_b64

# Stage-1 rows (one caption each, image 100 on two rows) and a stage-2 row (image 200, `&&`-joined captions).
ROWS = [["1", "100", "A man, riding a bike.", "person&&bike"],
        ["2", "100", "a person on a bike", ""],
        ["3", "200", "two dogs&&Dogs playing in the grass!", ""]]
DOCUMENTS = [[scst_sentence(c) for c in ("A man, riding a bike.", "a person on a bike")],
             [scst_sentence(c) for c in ("two dogs", "Dogs playing in the grass!")]]


@pytest.fixture
def caption_tsv(tmp_path):
    img = image_b64(32, 24)
    path = tmp_path / "caption_stage2_train.tsv"
    path.write_text("".join("\t".join(row + [img]) + "\n" for row in ROWS))
    return path


def test_tsv_groups_captions_by_image_in_scst_form(tmp_path, caption_tsv, capsys):
    out = tmp_path / "words.json.gz"
    assert main(["cider-df", "--tsv", str(caption_tsv), "--out", str(out)]) == 0
    assert "2 images" in capsys.readouterr().out
    payload = json.loads(gzip.decompress(out.read_bytes()))
    assert payload["format_version"] == 2 and payload["kind"] == "cider-document-frequencies"
    loaded = DocumentFrequencies.load(out)
    expected = DocumentFrequencies.from_references(DOCUMENTS)
    assert loaded.num_documents == 2 and dict(loaded.counts) == dict(expected.counts)
    assert loaded.counts["bike <eos>"] == 1 and loaded.counts["<eos>"] == 2
    # the SCST reward reads it straight from the path
    rewards = CiderD(out).score_scst(["a man riding a bike", "two dogs"], [ROWS[0][2:3] + ROWS[1][2:3]] * 2)
    assert rewards[0] > rewards[1] >= 0


def test_shards_give_the_same_cache_as_their_tsv(tmp_path, caption_tsv):
    shards = tmp_path / "shards"
    assert preprocess(["shards", "--format", "caption", "--input", str(caption_tsv), "--out", str(shards),
                       "--no-progress"]) == 0
    for source, path in (("--tsv", caption_tsv), ("--shards", shards)):
        assert main(["cider-df", source, str(path), "--out", str(tmp_path / f"{source[2:]}.json")]) == 0
    from_tsv = DocumentFrequencies.load(tmp_path / "tsv.json")
    from_shards = DocumentFrequencies.load(tmp_path / "shards.json")
    assert from_shards.num_documents == from_tsv.num_documents == 2
    assert dict(from_shards.counts) == dict(from_tsv.counts)


def test_cache_serves_validation_like_one_built_without_eos(tmp_path, caption_tsv):
    """Sentences scored without ` <eos>` meet only n-grams without it, whose counts do not depend on it."""
    assert main(["cider-df", "--tsv", str(caption_tsv), "--out", str(tmp_path / "df.json")]) == 0
    with_eos = CiderD(tmp_path / "df.json")
    without = CiderD(DocumentFrequencies.from_references([[d.removesuffix(" <eos>") for d in doc]
                                                          for doc in DOCUMENTS]))
    hyps, refs = ["a man riding a bike", "dogs in the grass"], [["a person on a bike"], ["two dogs"]]
    np.testing.assert_array_equal(with_eos.score_per_hypothesis(hyps, refs), without.score_per_hypothesis(hyps, refs))


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t100\n")
    assert main(["cider-df", "--tsv", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.tsv:1" in err and len(err.strip().splitlines()) == 1
    assert main(["cider-df", "--tsv", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "x.json")]) == 2
    assert main(["cider-df", "--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()

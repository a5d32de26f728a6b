"""The table of fine-tuning row formats (spec §7): one good and one broken row per format, through the converter."""

import base64
import json
import sys
import tarfile
from pathlib import Path

import pytest

from ofa_scale.data.convert import convert
from ofa_scale.data.tsv_formats import FORMATS, PRETRAIN_SOURCES

sys.path.insert(0, str(Path(__file__).parent))
from bad_inputs import jpeg  # noqa: E402

IMG = base64.urlsafe_b64encode(jpeg(64, 48, 9)).decode()
CODES_1024 = " ".join(str(i % 8192) for i in range(1024))

# format -> (good row columns, expected typed fields (subset), broken row columns, expected reject code)
CASES = {
    "caption": (["1", "img1", "a dog&&a brown dog", "dog&&grass", IMG],
                {"image_id": "img1", "captions": ["a dog", "a brown dog"], "objects": ["dog", "grass"]},
                ["2", "img2", "", "", IMG], "empty_text"),
    "vqa": (["q1", "img1", "what is it?", "0.3|!+cat&&1.0|!+dog", "dog", IMG],
            {"question": "what is it?", "answers": [{"answer": "cat", "conf": 0.3}, {"answer": "dog", "conf": 1.0}]},
            ["q2", "img1", "what?", "dog", "", IMG], "bad_answers"),
    "refcoco": (["r1", "img1", "left dog", "1,2,30,40", IMG], {"text": "left dog", "box": [1.0, 2.0, 30.0, 40.0]},
                ["r2", "img1", "left dog", "1,2,30", IMG], "box_not_numeric"),
    "snli_ve": (["s1", "img1", IMG, "a dog runs", "a dog in a park", "entailment"],
                {"hypothesis": "a dog runs", "caption": "a dog in a park", "label": "yes"},
                ["s2", "img1", IMG, "a dog runs", "x", "unsure"], "bad_label"),
    "ocr": (["o1", IMG, "中国人4"], {"uniq_id": "o1", "text": "中国人4"}, ["o2", IMG, " "], "empty_text"),
    "imagenet": ([IMG, "7", "cock"], {"uniq_id": "1", "label_index": 7, "class_name": "cock"},
                 [IMG, "seven", "cock"], "bad_label"),
    "image_gen": (["g1", CODES_1024, "a red circle"], {"caption": "a red circle", "codes": list(range(1024))},
                  ["g2", "1 2 3", "a red circle"], "bad_codes"),
    "gigaword": (["the article text", "the headline"], {"source": "the article text", "target": "the headline"},
                 ["the article text", ""], "empty_text"),
    "glue_cola": (["src", "the cat sat", "1"], {"sentence": "the cat sat", "label": "yes"},
                  ["src", "the cat sat", "2"], "bad_label"),
    "glue_sst2": (["a fine film", "1"], {"sentence": "a fine film", "label": "positive"},
                  ["a fine film"], "wrong_column_count"),
    "glue_mrpc": (["s one", "s two", "0"], {"sentence1": "s one", "sentence2": "s two", "label": "no"},
                  ["s one", "", "0"], "empty_text"),
    "glue_qqp": (["1", "2", "3", "q one?", "q two?", "1"], {"question1": "q one?", "label": "yes"},
                 ["1", "2", "3", "q one?", "q two?", "x"], "bad_label"),
    "glue_mnli": (["p", "h", "2", "extra", "columns"], {"sentence1": "p", "sentence2": "h", "label": "no"},
                  ["p", "h"], "wrong_column_count"),
    "glue_rte": (["0", "p", "h", "entailment"], {"label": "yes"}, ["0", "p", "h", "1"], "bad_label"),
    "glue_qnli": (["0", "q?", "s.", "not_entailment"], {"question": "q?", "sentence": "s.", "label": "no"},
                  ["0", "", "s.", "entailment"], "empty_text"),
}


def test_every_finetune_format_has_a_case():
    assert set(CASES) == set(FORMATS) - set(PRETRAIN_SOURCES)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_finetune_format_row_parsers(fmt, tmp_path):
    good, expected, broken, code = CASES[fmt]
    tsv = tmp_path / f"{fmt}.tsv"
    tsv.write_text("\t".join(good) + "\n" + "\t".join(broken) + "\n")
    m = convert(tmp_path / "out", finetune={fmt: tsv})
    s = m["sources"][fmt]
    assert (s["rows_read"], s["samples_written"], s["rejected"]) == (2, 1, 1)
    with tarfile.open(tmp_path / "out" / s["shards"][0]["path"]) as t:
        members = {m.name.split(".", 1)[1]: t.extractfile(m).read() for m in t.getmembers()}
    meta = json.loads(members["json"])
    assert {k: meta[k] for k in expected} == expected
    assert ("jpg" in members) == (FORMATS[fmt].image_column is not None)
    reject = (tmp_path / "out" / "rejects.tsv").read_text().splitlines()[1].split("\t")
    assert reject[1] == "2" and reject[3].split(":")[0] == code


def test_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_bytes(b"\xef\xbb\xbfid1\thello\n")
    m = convert(tmp_path / "out", text=tsv)
    with tarfile.open(tmp_path / "out" / m["sources"]["text"]["shards"][0]["path"]) as t:
        assert json.loads(t.extractfile(t.getmembers()[0]).read())["uniq_id"] == "id1"

"""The synthetic corpus: deterministic, in exact OFA formats, and true to its images."""

import base64
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data import tsv_formats
from ofa_scale.data.sample_corpus import COLOURS, TSV_NAMES, colour_codes, write_sample_corpus

ROWS = 96


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    write_sample_corpus(out, rows=ROWS, seed=3)
    return out


def _rows(path):
    return [line.split("\t") for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def _image(b64):
    return Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))


def test_same_seed_same_bytes_other_seed_differs(corpus, tmp_path):
    write_sample_corpus(tmp_path / "again", rows=ROWS, seed=3)
    write_sample_corpus(tmp_path / "other", rows=ROWS, seed=4)
    for name in TSV_NAMES + ("negative_sample/all_captions.txt", "negative_sample/type2ans.json"):
        assert (tmp_path / "again" / name).read_bytes() == (corpus / name).read_bytes(), name
    assert (tmp_path / "other" / TSV_NAMES[0]).read_bytes() != (corpus / TSV_NAMES[0]).read_bytes()


def test_every_row_parses_with_the_ofa_column_parsers(corpus):
    counts = {}
    for name, fmt in zip(TSV_NAMES, ("vl", "text", "image", "detection")):
        rows = _rows(corpus / name)
        counts[fmt] = len(rows)
        f = tsv_formats.FORMATS[fmt]
        for i, cols in enumerate(rows):
            uid, fields = f.parse(cols, i + 1)  # raises RowReject on any format error
            if f.image_column is not None:
                im = _image(cols[f.image_column])
                im.load()
                assert im.format in ("JPEG", "PNG")
                assert 96 <= min(im.size) and max(im.size) <= 320
    assert counts == {"vl": ROWS, "text": ROWS // 4, "image": ROWS // 8, "detection": ROWS // 8}


def test_vl_mix_quirks_and_qa_refs(corpus):
    rows = _rows(corpus / TSV_NAMES[0])
    types = Counter(r[7] for r in rows)
    assert set(types) == {"caption", "qa", "visual_grounding"}
    assert types["caption"] > types["qa"] > types["visual_grounding"] > 0
    ids = [r[0] for r in rows]
    assert len(set(ids)) == len(ids)
    assert any("." in i for i in ids) and any("#" in i for i in ids) and any(" " in i for i in ids)
    assert any("&&" in r[5] for r in rows)
    assert any(r[6] == "cc12m" for r in rows)
    captions = [r[2] for r in rows if r[7] == "caption"]
    assert any(c[0].isupper() for c in captions) and any(c[-1] in ".!" for c in captions)
    questions = [r[3].lower() for r in rows if r[7] == "qa"]
    assert any(q.startswith("how many") for q in questions)
    for r in rows:
        if r[7] == "qa":
            for item in r[4].split("&&"):
                conf, sep, ans = item.partition("|!+")
                assert sep and 0 < float(conf) <= 1 and ans


def test_grounding_boxes_are_true_for_the_pixels(corpus):
    """The centre of every referred shape has the colour its expression names (all shapes contain their
    box centre); this is what makes the corpus learnable."""
    checked = 0
    for r in _rows(corpus / TSV_NAMES[0]):
        if r[7] != "visual_grounding":
            continue
        colour = next(c for c in COLOURS if c in r[2].lower())
        x0, y0, x1, y1 = map(float, r[4].split(","))
        px = np.asarray(_image(r[1]).convert("RGB"))[int((y0 + y1) / 2), int((x0 + x1) / 2)].astype(int)
        assert np.abs(px - np.array(COLOURS[colour])).max() < 48, (r[0], colour, px)
        checked += 1
    assert checked >= 5


def test_image_rows_are_256_with_codes_of_the_centre(corpus):
    for uid, b64, codes in _rows(corpus / TSV_NAMES[2]):
        im = _image(b64)
        assert im.size == (256, 256)
        assert [int(c) for c in codes.split()] == colour_codes(im)


def test_detection_rows_have_boxes_inside_and_comma_names(corpus):
    names = set()
    for uid, b64, label in _rows(corpus / TSV_NAMES[3]):
        w, h = _image(b64).size
        for obj in tsv_formats.detection_objects(label):
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            names.add(obj["cat_name"])
    assert any("," in n for n in names)


def test_negative_files(corpus):
    neg = corpus / "negative_sample"
    t2a = json.loads((neg / "type2ans.json").read_text())
    assert "other" in t2a and "how many" in t2a
    caps = (neg / "all_captions.txt").read_text().splitlines()
    assert caps and len(caps) == len(set(caps))
    vl_caps = {r[2] for r in _rows(corpus / TSV_NAMES[0]) if r[7] == "caption"}
    assert set(caps) == vl_caps
    assert "red circle" in (neg / "object.txt").read_text().splitlines()


def test_cli_writes_corpus_and_rejects_bad_rows_argument(tmp_path, capsys):
    assert preprocess_main(["sample", "--out", str(tmp_path / "c"), "--rows", "8", "--seed", "1"]) == 0
    assert len((tmp_path / "c" / TSV_NAMES[0]).read_text().splitlines()) == 8
    assert preprocess_main(["sample", "--out", str(tmp_path / "d"), "--rows", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rows" in err

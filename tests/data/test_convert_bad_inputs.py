"""Every defect of the bad-input corpus becomes a counted reject with its exact reason; nothing is lost."""

import json
import sys
import tarfile
from pathlib import Path

import pytest

from ofa_scale.data.convert import convert

sys.path.insert(0, str(Path(__file__).parent))
from bad_inputs import write_bad_corpus  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    bad = write_bad_corpus(root / "in")
    manifest = convert(root / "out", **{k: v.path for k, v in bad.items()}, negatives=root / "in" / "negative_sample",
                       shard_size_mb=1, chunk_mb=0.01)
    return bad, manifest, root / "out"


def _rejects(out):
    lines = (out / "rejects.tsv").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "source\tline_number\tuniq_id\treason\tline" and lines[-1] == ""
    rows = [line.split("\t") for line in lines[1:-1]]
    assert all(len(r) == 5 for r in rows)  # tabs inside the shown line are escaped
    return rows


def _written_lines(out, source_manifest):
    lines = []
    for sh in source_manifest["shards"]:
        with tarfile.open(out / sh["path"]) as t:
            lines += [json.loads(t.extractfile(m).read())["line"] for m in t.getmembers() if m.name.endswith(".json")]
    return lines


@pytest.mark.parametrize("source", ["vl", "text", "image", "detection"])
def test_each_defect_is_rejected_with_its_reason(result, source):
    bad, manifest, out = result
    f, s = bad[source], manifest["sources"][source]
    # rows_read counts every line (blank ones too): nothing is silently dropped.
    assert s["rows_read"] == len(f.expected) == s["samples_written"] + s["rejected"]
    got = {int(r[1]): r[3].split(":")[0] for r in _rejects(out) if r[0] == source}
    want = {i + 1: code for i, code in enumerate(f.expected) if code is not None}
    assert got == want
    assert _written_lines(out, s) == [i + 1 for i, code in enumerate(f.expected) if code is None]
    assert sum(s["stats"]["rejects_by_reason"].values()) == s["rejected"]


def test_reject_rows_name_the_id_and_show_the_line(result):
    _, _, out = result
    rows = {(r[0], r[2]): r for r in _rejects(out)}
    assert rows[("vl", "bomb")][3].startswith("image_too_large")
    assert rows[("vl", "cols")][4].startswith("cols\\t")  # first 200 characters, tab escaped
    assert all(len(r[4]) <= 400 for r in rows.values())
    blank = [r for r in _rejects(out) if r[3] == "blank_line"]
    assert blank and all(r[2] == "" for r in blank)
    utf8 = [r for r in _rejects(out) if r[3].startswith("bad_utf8")]
    assert {r[2] for r in utf8} == {"badutf8", "t3"}  # the id is still readable when only later bytes are bad


def test_accepted_oddities_are_written_intact(result):
    bad, manifest, out = result
    metas = {}
    for src in ("vl", "detection", "text"):
        for sh in manifest["sources"][src]["shards"]:
            with tarfile.open(out / sh["path"]) as t:
                for m in t.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.loads(t.extractfile(m).read())
                        metas[meta["uniq_id"]] = meta
    assert metas["ok.last"]["caption"] == "Last row, no final newline!"  # no final newline
    assert metas["ok.vg"]["caption"] == "The circle" and metas["ok.vg"]["box"] == [4.5, 6.0, 60.0, 40.25]  # CRLF
    assert metas["ok qa#1"]["answers"] == [{"answer": "two", "conf": 0.6}, {"answer": "2", "conf": 1.0}]
    assert metas["t5"]["text"] == "Windows line ending."  # CRLF: no stray \r
    assert metas["ok.big"]["image"]["width"] == 6000
    assert [o["cat_name"] for o in metas["d1"]["objects"]] == ["star, five-pointed", "circle"]
    assert metas["d6"]["objects"][0]["box"] == [0.0, 0.0, 100.0, 80.0]  # 0.5 px overshoot clipped

"""Converter faults: empty sources, unbounded or binary reject fields, a full disk, and the start method of its
worker pool (fork server or spawn: the same bytes). Also the OFA stripping of gt_objects and category names."""

import errno
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data import convert as conv
from ofa_scale.data import rejects_tsv, shard_writer
from ofa_scale.data.convert import convert
from ofa_scale.data.loader_pass import _default_composition
from ofa_scale.data.sample_corpus import write_sample_corpus
from ofa_scale.data.stream_catalog import load_catalog
from ofa_scale.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from bad_inputs import _b64, jpeg  # noqa: E402
from bad_inputs import output_digest as _digest  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_sample_corpus(d, rows=48, seed=3)
    return d


def _metas(out, source_manifest):
    metas = []
    for sh in source_manifest["shards"]:
        with tarfile.open(out / sh["path"]) as t:
            metas += [json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")]
    return metas


def _one_line_error(capsys, argv):
    rc = preprocess_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    return err


def _temporaries(out):
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------- empty sources
@pytest.mark.parametrize("workers", [1, 2])
def test_a_source_whose_inputs_are_all_empty_has_zero_rows_and_says_so(corpus, tmp_path, workers):
    empty_a, empty_b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    empty_a.write_bytes(b"")
    empty_b.write_bytes(b"")
    out = tmp_path / "out"
    m = convert(out, vl=corpus / "vision_language_examples.tsv", text=[empty_a, empty_b], workers=workers,
                chunk_mb=0.25)
    t = m["sources"]["text"]
    assert (t["rows_read"], t["samples_written"], t["rejected"], t["shards"]) == (0, 0, 0, [])
    assert t["inputs_empty"] is True and m["sources"]["vl"]["inputs_empty"] is False
    assert json.loads((out / "manifest.json").read_text()) == m
    assert pq.read_table(out / t["index"]).num_rows == 0
    # The loader takes the other sources and refuses the empty one in one sentence.
    assert load_catalog(out, ["vl"])["vl"].num_samples == m["sources"]["vl"]["samples_written"]
    assert _default_composition(str(out)) == {"vl": 8}
    with pytest.raises(UserError, match="'text' has no samples"):
        load_catalog(out, ["text"])
    # --resume of such a conversion works too.
    assert convert(out, vl=corpus / "vision_language_examples.tsv", text=[empty_a, empty_b], workers=workers,
                   chunk_mb=0.25, resume=True)["sources"] == m["sources"]


def test_an_empty_file_among_others_leaves_line_numbers_alone(tmp_path):
    a, b, c = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "c.tsv"
    a.write_text("x\tone\n")
    b.write_bytes(b"")
    c.write_text("y\ttwo\n")
    m = convert(tmp_path / "out", text=[a, b, c])
    s = m["sources"]["text"]
    assert (s["rows_read"], s["inputs_empty"]) == (2, False)
    assert [(x["line"], x["file"]) for x in _metas(tmp_path / "out", s)] == [(1, "a.tsv"), (1, "c.tsv")]


# ----------------------------------------------------------------------------------------------- rejects.tsv
def test_reject_fields_are_bounded_and_escaped(tmp_path):
    huge_id = "H" * (5 << 20)
    vl = tmp_path / "vl.tsv"
    rows = [
        f"{huge_id}\tnot-base64!!\tcap\t\t\t\tcoco\tcaption".encode(),  # 5 MB id, bad image
        b"nul\x00id\t" + _b64(jpeg(32, 24)).encode() + b"\tA\x00B\x07\t\t\t\tcoco\tpose",  # NUL/BEL bytes
        b"short\tonly\ttwo\x1b[31m",  # wrong column count, an ANSI escape in the shown line
    ]
    vl.write_bytes(b"\n".join(rows) + b"\n")
    m = convert(tmp_path / "out", vl=vl)
    assert m["sources"]["vl"]["rejected"] == 3
    data = (tmp_path / "out" / "rejects.tsv").read_bytes()
    assert len(data) < 4096  # a 5 MB line made a 5 MB rejects.tsv before
    assert b"\x00" not in data and b"\x07" not in data and b"\x1b" not in data
    lines = data.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 5
    fields = [line.split("\t") for line in lines[1:-1]]
    assert all(len(f) == 5 for f in fields)
    big, nul, short = fields
    assert big[2] == "H" * rejects_tsv.MAX_ID_CHARS + f"…({5 << 20} bytes in all)"
    assert big[3].startswith("bad_base64") and len(big[4]) < 2 * rejects_tsv.MAX_LINE_CHARS
    assert nul[2] == "nul\\x00id" and nul[3].startswith("bad_type")
    assert short[4] == "short\\tonly\\ttwo\\x1b[31m"


def test_reject_field_escaping_round_trips_every_control_character():
    value = "".join(chr(i) for i in range(32)) + "\x7f\\é"
    escaped = rejects_tsv.field(value, 1000)
    assert escaped.isprintable() and "\t" not in escaped
    assert escaped.encode().decode("unicode_escape").encode("latin-1").decode("utf-8") == value
    assert rejects_tsv.field(b"\xff" + b"a" * 10, 4) == "\ufffdaaa…(11 bytes in all)"


# ----------------------------------------------------------------------------------------------- OFA stripping
def test_gt_objects_and_category_names_are_stripped_as_ofa_does(tmp_path):
    img = _b64(jpeg(100, 80, 1))
    vl = tmp_path / "vl.tsv"
    vl.write_text("\t".join(["v1", img, "a dog and a cat", "", "", "  dog&&cat \u3000", "coco", "caption"]) + "\n" +
                  "\t".join(["v2", img, "a dog", "", "", "dog && cat&& &&", "coco", "caption"]) + "\n")
    det = tmp_path / "det.tsv"
    det.write_text(f"d1\t{img}\t 1,2,30,40,5,star, five-pointed  && 50,10,99,79,1, circle && \n")
    out = tmp_path / "out"
    m = convert(out, vl=vl, detection=det)
    vl_meta = {x["uniq_id"]: x for x in _metas(out, m["sources"]["vl"])}
    # OFA: gt_objects.strip().split('&&'); blank entries are dropped (OFA would replace '' in the caption).
    assert vl_meta["v1"]["gt_objects"] == ["dog", "cat"]
    assert vl_meta["v2"]["gt_objects"] == ["dog ", " cat"]
    # OFA: label.strip().split('&&'), then each item .strip().split(',', 5): trailing spaces of a name go.
    [d1] = _metas(out, m["sources"]["detection"])
    assert [o["cat_name"] for o in d1["objects"]] == ["star, five-pointed", " circle"]
    assert [o["box"] for o in d1["objects"]] == [[1.0, 2.0, 30.0, 40.0], [50.0, 10.0, 99.0, 79.0]]


# ----------------------------------------------------------------------------------------------- start method
@pytest.mark.parametrize("method", ["default", "spawn"])
def test_output_is_identical_for_any_worker_count_and_start_method(corpus, tmp_path, monkeypatch, method):
    kw = dict(vl=corpus / "vision_language_examples.tsv", text=corpus / "text_examples.tsv", shard_size_mb=0.1,
              chunk_mb=0.1)
    one = convert(tmp_path / "w1", **kw)
    if method != "default":  # the default is a fork server where there is one
        monkeypatch.setattr(conv, "_pool_context", lambda: multiprocessing.get_context(method))
    three = convert(tmp_path / "w3", **kw, workers=3)
    assert len(one["sources"]["vl"]["shards"]) > 3
    assert _digest(tmp_path / "w1") == _digest(tmp_path / "w3") and one["sources"] == three["sources"]


# ----------------------------------------------------------------------------------------------- disk full
class _DiskFillsUp:
    """Shard bytes beyond `capacity` fail with ENOSPC, as a full disk makes write(2) fail."""

    def __init__(self, capacity: int):
        self.left = capacity
        self.real = shard_writer._HashingWriter.write

    def write(self, hw, b):
        self.left -= len(b)
        if self.left < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(hw, b)


def test_disk_full_mid_shard_is_one_sentence_and_resume_finishes(corpus, tmp_path, monkeypatch, capsys):
    vl = str(corpus / "vision_language_examples.tsv")
    argv = ["shards", "--vl", vl, "--shard-size-mb", "0.05", "--chunk-mb", "0.1", "--no-progress"]
    fresh = tmp_path / "fresh"
    assert preprocess_main(argv + ["--out", str(fresh)]) == 0
    capsys.readouterr()
    total = sum(s["bytes"] for s in json.loads((fresh / "manifest.json").read_text())["sources"]["vl"]["shards"])

    out = tmp_path / "out"
    disk = _DiskFillsUp(total // 2)
    monkeypatch.setattr(shard_writer._HashingWriter, "write", lambda hw, b: disk.write(hw, b))
    err = _one_line_error(capsys, argv + ["--out", str(out)])
    assert "is full" in err and "--resume" in err
    assert not (out / "manifest.json").exists() and _temporaries(out) == []
    progress = json.loads((out / conv.PROGRESS_FILE).read_text())
    done = [c for c in progress["chunks"] if c["result"]]
    assert 0 < len(done) < len(progress["chunks"])  # the chunks finished before the disk filled are kept

    monkeypatch.undo()
    assert preprocess_main(argv + ["--out", str(out), "--resume"]) == 0
    assert _digest(out) == _digest(fresh)


def test_disk_full_while_publishing_leaves_the_published_conversion_intact(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["shards", "--text", str(corpus / "text_examples.tsv"), "--vl", str(corpus / "vision_language_examples.tsv"),
            "--out", str(out), "--chunk-mb", "0.1", "--no-progress"]
    assert preprocess_main(argv) == 0
    def published():  # everything but the converter's own progress file
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
                if p.is_file() and p.name != conv.PROGRESS_FILE}

    before = published()

    real_replace = os.replace

    def full_when_publishing(src, dst, *a, **k):  # every file is complete, then its rename finds no space
        if Path(dst).name in ("rejects.tsv", "manifest.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(conv.os, "replace", full_when_publishing)
    err = _one_line_error(capsys, argv + ["--resume"])
    assert "is full" in err
    monkeypatch.undo()
    assert published() == before


def test_a_real_full_disk_under_two_workers(corpus, tmp_path, capsys):
    """A 1 MiB tmpfs: the worker processes hit ENOSPC for real. Needs permission to mount (root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(r.stderr or r.stdout).strip() or r.returncode}); the "
                    f"monkeypatched disk-full tests above still ran")
    try:
        big = tmp_path / "vl.tsv"
        with open(big, "w") as f:
            for i in range(12):  # ~1.6 MB of images: more than the disk holds
                f.write("\t".join([f"r{i}", _b64(jpeg(300, 300, i, quality=95)), "x", "", "", "", "c", "caption"])
                        + "\n")
        err = _one_line_error(capsys, ["shards", "--vl", str(big), "--out", str(mnt / "out"), "--workers", "2",
                                       "--chunk-mb", "0.2", "--shard-size-mb", "0.1", "--no-progress"])
        assert "is full" in err and "--resume" in err
        assert not (mnt / "out" / "manifest.json").exists() and _temporaries(mnt / "out") == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

"""TSV -> webdataset conversion: interface format, worker-count invariance, resume, downscaling, user errors."""

import base64
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data.convert import convert
from ofa_scale.data.sample_corpus import write_sample_corpus

sys.path.insert(0, str(Path(__file__).parent))
from bad_inputs import flat_jpeg, jpeg, output_digest  # noqa: E402

KEY = re.compile(r"^\d{9}-[A-Za-z0-9_-]{0,64}$")
SMALL_CHUNK_MB = 0.25  # several chunks per file, so parallelism and resume have something to split


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_sample_corpus(d, rows=64, seed=1)
    return d


def _inputs(c):
    return dict(vl=c / "vision_language_examples.tsv", text=c / "text_examples.tsv",
                image=c / "image_examples.tsv", detection=c / "detection_examples.tsv",
                negatives=c / "negative_sample")


def _read_tar(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def _digest(out):
    return output_digest(out)


@pytest.fixture(scope="module")
def converted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    manifest = convert(out, **_inputs(corpus), shard_size_mb=0.2, chunk_mb=SMALL_CHUNK_MB)
    return out, manifest


def test_manifest_shards_and_samples_follow_the_interface(converted, corpus):
    out, m = converted
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["tool_version"] and m["command"]
    for name, expected in (("vl", 64), ("text", 16), ("image", 8), ("detection", 8)):
        s = m["sources"][name]
        assert s["rows_read"] == expected == s["samples_written"] + s["rejected"]
        keys = []
        for i, sh in enumerate(s["shards"]):
            assert sh["path"] == f"{name}/{name}-{i:06d}.tar"
            data = (out / sh["path"]).read_bytes()
            assert len(data) == sh["bytes"] and hashlib.sha256(data).hexdigest() == sh["sha256"]
            members = _read_tar(out / sh["path"])
            groups = {}
            for member, blob in members:
                key, ext = member.split(".", 1)
                groups.setdefault(key, {})[ext] = blob
            assert sum(1 for _ in groups) == sh["samples"]
            for key, g in groups.items():
                assert KEY.match(key), key
                meta = json.loads(g["json"])
                assert meta["source"] == name and key.startswith(f"{meta['line']:09d}-")
                if name in ("vl", "image", "detection"):
                    ext = "jpg" if meta["image"]["format"] == "jpeg" else "png"
                    im = Image.open(io.BytesIO(g[ext]))
                    assert im.size == (meta["image"]["width"], meta["image"]["height"])
                    assert meta["image"]["scale"] == 1.0
                keys.append(key)
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        index = pq.read_table(out / s["index"]).to_pylist()
        assert [r["key"] for r in index] == keys
    # negatives copied verbatim
    for f in ("all_captions.txt", "object.txt", "type2ans.json"):
        assert (out / "negatives" / f).read_bytes() == (corpus / "negative_sample" / f).read_bytes()
    assert (out / "rejects.tsv").read_text().splitlines() == ["source\tline_number\tuniq_id\treason\tline"]
    assert m["sources"]["vl"]["stats"]["types"].keys() == {"caption", "qa", "visual_grounding"}


def test_typed_json_matches_the_tsv_row(converted, corpus):
    out, m = converted
    rows = (corpus / "vision_language_examples.tsv").read_text().split("\n")
    for member, blob in _read_tar(out / m["sources"]["vl"]["shards"][0]["path"]):
        if not member.endswith(".json"):
            continue
        meta = json.loads(blob)
        cols = rows[meta["line"] - 1].split("\t")
        assert meta["uniq_id"] == cols[0] and meta["type"] == cols[7] and meta["dataset_name"] == cols[6]
        assert meta["gt_objects"] == [o for o in cols[5].split("&&") if o]
        if cols[7] == "qa":
            assert meta["answers"] == [{"answer": a.split("|!+")[1], "conf": float(a.split("|!+")[0])}
                                       for a in cols[4].split("&&")]
        if cols[7] == "visual_grounding":
            assert meta["box"] == [float(v) for v in cols[4].split(",")]
        else:
            assert meta["box"] is None
    img_rows = (corpus / "image_examples.tsv").read_text().split("\n")
    for member, blob in _read_tar(out / m["sources"]["image"]["shards"][0]["path"]):
        if member.endswith(".json"):
            meta = json.loads(blob)
            assert meta["codes"] == [int(c) for c in img_rows[meta["line"] - 1].split("\t")[2].split()]


def test_output_is_identical_for_one_and_two_workers(converted, corpus, tmp_path):
    out1, m1 = converted
    m2 = convert(tmp_path / "w2", **_inputs(corpus), shard_size_mb=0.2, chunk_mb=SMALL_CHUNK_MB, workers=2)
    assert sum(len(s["shards"]) for s in m2["sources"].values()) > 4
    assert _digest(out1) == _digest(tmp_path / "w2")
    assert m1["sources"] == m2["sources"]


def test_resume_keeps_verified_shards_and_redoes_the_rest(corpus, tmp_path):
    out = tmp_path / "out"
    # Shards larger than chunks: one shard per chunk, so damaging two shards leaves the others' chunks intact.
    kw = dict(**_inputs(corpus), shard_size_mb=1, chunk_mb=SMALL_CHUNK_MB)
    m = convert(out, **kw)
    before = _digest(out)
    shards = [s["path"] for s in m["sources"]["vl"]["shards"]]
    assert len(shards) >= 3
    corrupt, deleted, kept = out / shards[0], out / shards[-1], out / shards[1]
    corrupt.write_bytes(corrupt.read_bytes()[:1000])  # a half-written shard
    deleted.unlink()
    (out / "manifest.json").unlink()  # the run "died" before finishing
    kept_stat = kept.stat()
    m2 = convert(out, **kw, resume=True)
    assert _digest(out) == before
    assert m2["sources"] == m["sources"]
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept_stat.st_ino, kept_stat.st_mtime_ns)  # not rewritten


def test_interrupted_chunk_is_redone(corpus, tmp_path, monkeypatch):
    """A crash in the middle of a chunk leaves a partial progress file; --resume completes it."""
    from ofa_scale.data import convert as conv

    out = tmp_path / "out"
    kw = dict(vl=corpus / "vision_language_examples.tsv", shard_size_mb=0.2, chunk_mb=SMALL_CHUNK_MB)
    real, calls = conv.convert_chunk, []

    def crash_on_third(task):
        calls.append(task.chunk_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(conv, "convert_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert(out, **kw)
    assert not (out / "manifest.json").exists()
    progress = json.loads((out / conv.PROGRESS_FILE).read_text())
    assert sum(c["result"] is not None for c in progress["chunks"]) == 2
    monkeypatch.setattr(conv, "convert_chunk", real)
    with pytest.raises(Exception, match="--resume"):
        convert(out, **kw)
    m = convert(out, **kw, resume=True)
    fresh = convert(tmp_path / "fresh", **kw)
    assert m["sources"] == fresh["sources"]
    assert _digest(out) == _digest(tmp_path / "fresh")


def _b64(b):
    return base64.urlsafe_b64encode(b).decode()


def test_downscale_rescales_boxes_and_records_scale(tmp_path):
    vl = tmp_path / "vl.tsv"
    big, small = jpeg(1200, 800, 1), jpeg(300, 200, 2)
    vl.write_text("\n".join([
        "\t".join(["a.1", _b64(big), "the thing", "", "120,80,600,400", "", "refcoco", "visual_grounding"]),
        "\t".join(["a.2", _b64(small), "a small one", "", "", "", "coco", "caption"]),
    ]) + "\n")
    det = tmp_path / "det.tsv"
    det.write_text("d\t" + _b64(big) + "\t0,0,1200,800,1,all&&300,200,600,400,2,part\n")
    m = convert(tmp_path / "out", vl=vl, detection=det, downscale_shorter_side=400)
    samples = {}
    for src in ("vl", "detection"):
        for name, blob in _read_tar(tmp_path / "out" / m["sources"][src]["shards"][0]["path"]):
            samples.setdefault(name.split(".")[0], {})[name.split(".", 1)[1]] = blob
    metas = {json.loads(s["json"])["uniq_id"]: (json.loads(s["json"]), s) for s in samples.values()}
    meta, s = metas["a.1"]
    assert meta["image"] == {"format": "jpeg", "width": 600, "height": 400, "orig_width": 1200,
                             "orig_height": 800, "scale": 0.5}
    assert Image.open(io.BytesIO(s["jpg"])).size == (600, 400)
    assert meta["box"] == [60.0, 40.0, 300.0, 200.0]
    meta, s = metas["a.2"]  # shorter side 200 <= 400: untouched, original bytes
    assert meta["image"]["scale"] == 1.0 and s["jpg"] == small
    meta, _ = metas["d"]
    assert [o["box"] for o in meta["objects"]] == [[0.0, 0.0, 600.0, 400.0], [150.0, 100.0, 300.0, 200.0]]
    assert m["sources"]["vl"]["stats"]["downscaled"] == 1


def test_very_large_valid_image_is_accepted(tmp_path):
    vl = tmp_path / "vl.tsv"
    vl.write_text("\t".join(["big", _b64(flat_jpeg(8000, 6000)), "Huge.", "", "", "", "x", "caption"]))
    m = convert(tmp_path / "out", vl=vl)
    assert m["sources"]["vl"]["samples_written"] == 1


def test_parquet_input_becomes_caption_rows(tmp_path):
    table = pa.table({"key": ["000001", "000002", "000003"],
                      "jpg": [jpeg(50, 40, 1), None, b"not an image"],
                      "txt": ["A photo.", "missing image", "broken"]})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    m = convert(tmp_path / "out", vl_parquet=[tmp_path / "part.parquet"])
    s = m["sources"]["vl"]
    assert (s["rows_read"], s["samples_written"], s["rejected"]) == (3, 1, 2)
    meta = [json.loads(b) for n, b in _read_tar(tmp_path / "out" / s["shards"][0]["path"]) if n.endswith(".json")]
    assert meta[0]["caption"] == "A photo." and meta[0]["type"] == "caption" and meta[0]["uniq_id"] == "000001"
    reasons = [line.split("\t")[3].split(":")[0] for line in (tmp_path / "out" / "rejects.tsv").read_text()
               .splitlines()[1:]]
    assert reasons == ["missing_image", "not_an_image"]


def test_finetune_format_through_the_cli(tmp_path, capsys):
    tsv = tmp_path / "refcoco.tsv"
    tsv.write_text("\t".join(["u1", "img7", "the left dog", "1,2,30,40", _b64(jpeg(64, 48, 3))]) + "\n" +
                   "\t".join(["u2", "img8", "bad box", "1,2,300,40", _b64(jpeg(64, 48, 3))]) + "\n")
    rc = preprocess_main(["shards", "--format", "refcoco", "--input", str(tsv), "--out", str(tmp_path / "o"),
                          "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    s = m["sources"]["refcoco"]
    assert (s["samples_written"], s["rejected"]) == (1, 1)
    meta = [json.loads(b) for n, b in _read_tar(tmp_path / "o" / s["shards"][0]["path"]) if n.endswith(".json")]
    assert meta[0]["box"] == [1.0, 2.0, 30.0, 40.0] and meta[0]["text"] == "the left dog"


def test_keys_stay_unique_across_several_input_files(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text("x\tone\ny\ttwo\n")
    b.write_text("x\tthree\n")
    m = convert(tmp_path / "out", text=str(tmp_path / "*.tsv"))
    names = [n for sh in m["sources"]["text"]["shards"] for n, _ in _read_tar(tmp_path / "out" / sh["path"])]
    assert names == ["000000001-x.json", "000000002-y.json", "000000003-x.json"]
    metas = [json.loads(b) for sh in m["sources"]["text"]["shards"] for _, b in _read_tar(tmp_path / "out" / sh["path"])]
    assert [(x["line"], x.get("file")) for x in metas] == [(1, "a.tsv"), (2, "a.tsv"), (1, "b.tsv")]


def _one_line_error(capsys, argv):
    rc = preprocess_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    return err


def test_user_errors_are_one_line_and_write_no_manifest(corpus, tmp_path, capsys):
    vl = str(corpus / "vision_language_examples.tsv")
    err = _one_line_error(capsys, ["shards", "--vl", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "o1")])
    assert "missing.tsv" in err and not (tmp_path / "o1" / "manifest.json").exists()

    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _one_line_error(capsys, ["shards", "--vl", vl, "--out", str(blocker / "sub")])
    assert "--out" in err

    out = tmp_path / "o2"
    assert preprocess_main(["shards", "--text", str(corpus / "text_examples.tsv"), "--out", str(out),
                            "--no-progress"]) == 0
    capsys.readouterr()
    before = (out / "manifest.json").read_bytes()
    err = _one_line_error(capsys, ["shards", "--vl", vl, "--out", str(out), "--resume"])
    assert "different conversion" in err and (out / "manifest.json").read_bytes() == before
    err = _one_line_error(capsys, ["shards", "--text", str(corpus / "text_examples.tsv"), "--out", str(out)])
    assert "--resume" in err

    err = _one_line_error(capsys, ["shards", "--vl", vl, "--negatives", str(tmp_path), "--out", str(tmp_path / "o3")])
    assert "type2ans.json" in err and not (tmp_path / "o3" / "manifest.json").exists()

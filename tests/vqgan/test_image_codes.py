"""`ofa-preprocess image-codes` on a folder of real photos (scikit-image's samples) and on an OFA code TSV:
rows in the formats of spec §1.3 / §7.6, bad images counted as rejects, and a resumed run equal to an
uninterrupted one."""

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data.tsv_formats import FORMATS
from ofa_scale.errors import UserError
from ofa_scale.vqgan import load_vqgan
from ofa_scale.vqgan.image_codes import write_image_codes

sys.path.insert(0, str(Path(__file__).parent))
from vqgan_helpers import write_taming_dir  # noqa: E402

PHOTOS = {"astronaut.jpg": "astronaut", "coffee.png": "coffee", "chelsea.jpg": "chelsea",
          "sub/rocket.jpg": "rocket", "camera.png": "camera"}


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    return write_taming_dir(tmp_path_factory.mktemp("vqgan") / "vq")


@pytest.fixture(scope="module")
def model(vqgan_dir):
    return load_vqgan(vqgan_dir, device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name, fn in PHOTOS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, fn)()).save(root / name, quality=90)
    (root / "chelsea.txt").write_text("a cat\nlooking at the camera\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.md").write_text("not an image, not a row")
    return root


def _rows(path):
    return [line.split("\t") for line in Path(path).read_text().splitlines()]


def test_folder_of_photos_to_image_examples_rows(tmp_path, vqgan_dir, model, photos, capsys):
    out = tmp_path / "image_examples.tsv"
    rc = preprocess_main(["image-codes", "--vqgan", str(vqgan_dir), "--input", str(photos), "--out", str(out),
                          "--device", "cpu", "--batch-size", "2", "--no-progress"])
    assert rc == 0
    assert "6 rows read, 5 written, 1 rejected" in capsys.readouterr().out
    rows = _rows(out)
    assert [r[0] for r in rows] == sorted(PHOTOS)  # sorted relative paths; the broken file is not a row
    for r in rows:
        FORMATS["image"].parse(r, 1)  # the shard converter's own schema accepts the row
        img = Image.open(io.BytesIO(base64.urlsafe_b64decode(r[1]))).convert("RGB")
        assert img.size == (256, 256)
        codes = [int(c) for c in r[2].split()]
        assert len(codes) == 256 and all(0 <= c < 64 for c in codes)
        # the codes are those of the stored image's central 128x128, so anyone can recompute them
        assert model.encode(np.asarray(img)[None, 64:192, 64:192]).reshape(-1).tolist() == codes
    rejects = _rows(tmp_path / "image_examples.tsv.rejects.tsv")
    assert rejects[0] == ["source", "line_number", "uniq_id", "reason", "line"]
    assert len(rejects) == 2 and rejects[1][2] == "broken.jpg"
    assert rejects[1][3].split(":")[0] in ("not_an_image", "truncated_image")
    manifest = json.loads((tmp_path / "image_examples.tsv.manifest.json").read_text())
    assert (manifest["rows_read"], manifest["samples_written"], manifest["rejected"]) == (6, 5, 1)
    assert sum(manifest["rejects_by_reason"].values()) == 1


def test_image_gen_rows_have_1024_codes_and_a_caption(tmp_path, vqgan_dir, model, photos):
    out = tmp_path / "gen.tsv"
    write_image_codes(model, vqgan_dir, photos, out, mode="image_gen", batch_size=4)
    rows = {r[0]: r for r in _rows(out)}
    assert rows["chelsea.jpg"][2] == "a cat looking at the camera" and rows["sub/rocket.jpg"][2] == "rocket"
    for r in rows.values():
        _, fields = FORMATS["image_gen"].parse(r, 1)
        assert len(fields["codes"]) == 1024
    # decode(codes) renders the 256x256 image generation would produce
    assert model.decode([fields["codes"]]).shape == (1, 256, 256, 3)


def test_ofa_code_tsv_input_with_bad_rows(tmp_path, vqgan_dir, model, photos):
    jpg = base64.urlsafe_b64encode((photos / "astronaut.jpg").read_bytes()).decode()
    png = base64.b64encode((photos / "coffee.png").read_bytes()).decode()
    tsv = tmp_path / "in.tsv"
    tsv.write_text(f"u1\timg1\t{jpg}\tan astronaut\nimg2\t{png}\nu3\timg3\t!!notbase64\tx\nu4\tonly three\tcols\n\n")
    out = tmp_path / "gen.tsv"
    m = write_image_codes(model, vqgan_dir, tsv, out, mode="image_gen", batch_size=8)
    assert [r[0] for r in _rows(out)] == ["u1"] and _rows(out)[0][2] == "an astronaut"
    assert m["rejects_by_reason"] == {"empty_text": 1, "bad_base64": 1, "wrong_column_count": 1, "blank_line": 1}
    ex = write_image_codes(model, vqgan_dir, tsv, tmp_path / "ex.tsv", mode="examples")
    assert [r[0] for r in _rows(tmp_path / "ex.tsv")] == ["u1", "img2"] and ex["rejected"] == 3


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, vqgan_dir, model, photos, monkeypatch):
    full = tmp_path / "full.tsv"
    write_image_codes(model, vqgan_dir, photos, full, batch_size=2, sample=True, seed=5)
    out = tmp_path / "resumed.tsv"
    calls = {"n": 0}
    real = model.encode

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(model, "encode", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        write_image_codes(model, vqgan_dir, photos, out, batch_size=2, sample=True, seed=5)
    monkeypatch.setattr(model, "encode", real)
    assert not out.exists()  # the output appears only when complete
    partial = tmp_path / ".resumed.tsv.partial"
    with open(partial, "ab") as f:
        f.write(b"half a row that no progress record covers")
    with pytest.raises(UserError, match="pass --resume"):
        write_image_codes(model, vqgan_dir, photos, out, batch_size=2, sample=True, seed=5)
    with pytest.raises(UserError, match="other inputs or options"):
        write_image_codes(model, vqgan_dir, photos, out, batch_size=2, resume=True)  # argmax, not sampled
    m = write_image_codes(model, vqgan_dir, photos, out, batch_size=3, sample=True, seed=5, resume=True)
    assert out.read_bytes() == full.read_bytes()
    assert (tmp_path / "resumed.tsv.rejects.tsv").read_bytes() == (tmp_path / "full.tsv.rejects.tsv").read_bytes()
    assert (m["rows_read"], m["samples_written"], m["rejected"]) == (6, 5, 1)
    again = write_image_codes(model, vqgan_dir, photos, out, resume=True, sample=True, seed=5)  # finished: verify
    assert again["samples_written"] == 5 and out.read_bytes() == full.read_bytes()

"""`ofa-preprocess sample --vqgan DIR`: the image-infilling rows carry that VQGAN's codes of the central 128x128."""

import base64
import io
import json
import sys
from pathlib import Path

from PIL import Image

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data.sample_corpus import colour_codes
from ofa_scale.vqgan import load_vqgan
from ofa_scale.vqgan.images import centre_pixels

sys.path.insert(0, str(Path(__file__).parent))
from vqgan_helpers import write_taming_dir  # noqa: E402


def test_sample_corpus_uses_the_vqgan_for_image_codes(tmp_path):
    vq = write_taming_dir(tmp_path / "vq")
    out = tmp_path / "corpus"
    assert preprocess_main(["sample", "--out", str(out), "--rows", "16", "--vqgan", str(vq),
                            "--finetune-images", "0", "--text-rows", "0"]) == 0
    model = load_vqgan(vq, device="cpu")
    rows = [line.split("\t") for line in (out / "image_examples.tsv").read_text().splitlines()]
    assert len(rows) == 2
    for _, b64, codes in rows:
        img = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
        got = [int(c) for c in codes.split()]
        assert got == model.encode(centre_pixels(img)[None]).reshape(-1).tolist()
        assert got != colour_codes(img)
    assert "VQGAN codes" in json.loads((out / "sample_corpus.json").read_text())["codes"]

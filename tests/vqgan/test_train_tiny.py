"""The tiny VQGAN trainer writes a taming checkpoint that `load_vqgan` and `ofa-preprocess sample --vqgan` read, and
(issue 11 §4, slow) a few hundred steps reconstruct held-out scenes better than the colour quantiser, as a PSNR
ratio with the same 16x16 codes per central 128x128."""

import base64
import io

import pytest
import torch
from PIL import Image

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data.sample_corpus import colour_codes
from ofa_scale.vqgan import load_vqgan
from ofa_scale.vqgan.checkpoint import save_taming_checkpoint
from ofa_scale.vqgan.images import centre_pixels
from ofa_scale.vqgan.train_tiny import compare, main, scene_images, train_tiny


def test_trainer_cli_writes_a_loadable_taming_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["--out", str(out), "--steps", "4", "--train-images", "2", "--eval-images", "1", "--batch", "2",
                 "--crop", "32"]) == 0
    printed = capsys.readouterr().out
    assert "tiny VQGAN" in printed and "colour quantiser" in printed
    model = load_vqgan(out, device="cpu")
    assert model.config.quantizer == "vq" and model.downsample_factor == 8
    img = scene_images(1, seed=9)[0]
    codes = model.encode([img])
    assert codes.shape == (1, 32, 32) and int(codes.max()) < model.n_embed
    assert model.decode(codes).shape == (1, 256, 256, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run (the k-means++ palette, a few decoder steps): enough for codes that vary."""
    model = train_tiny(scene_images(8, seed=0), steps=30, batch=4)
    out = tmp_path_factory.mktemp("tiny_vqgan")
    save_taming_checkpoint(model, out, global_step=30)
    return model, out


def test_sample_corpus_takes_the_trained_checkpoint(trained, tmp_path):
    model, vq_dir = trained
    out = tmp_path / "corpus"
    assert preprocess_main(["sample", "--out", str(out), "--rows", "16", "--vqgan", str(vq_dir),
                            "--finetune-images", "0", "--text-rows", "0"]) == 0
    loaded = load_vqgan(vq_dir, device="cpu")
    rows = [line.split("\t") for line in (out / "image_examples.tsv").read_text().splitlines()]
    assert rows
    seen = set()
    for _, b64, codes in rows:
        img = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
        got = [int(c) for c in codes.split()]
        assert got == loaded.encode(centre_pixels(img)[None]).reshape(-1).tolist()
        assert got == model.encode(centre_pixels(img)[None]).reshape(-1).tolist()  # the saved file is the model
        assert len(got) == 256 and got != colour_codes(img)
        seen.update(got)
    assert len(seen) > 1  # (one scene's centre may be one flat colour, hence one code; the corpus is not)


@pytest.mark.slow
def test_two_hundred_steps_beat_the_colour_quantiser():
    """The trainer's defaults (64 scenes, 64x64 crops, the decoder learning on the colour path's k-means palette)
    for 200 steps, against the colour quantiser's 8192 colours on 16 held-out scenes. Measured on this machine:
    24.37 vs 23.88 dB, ratio 1.020 (the initialisation alone: 23.66 dB, 0.991; last session's trainer, 300 steps:
    22.98 dB, 0.962)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the figures above are single-threaded; CPU kernels may round differently)
    try:
        model = train_tiny(scene_images(64, seed=0), steps=200)
    finally:
        torch.set_num_threads(threads)
    c = compare(model, scene_images(16, seed=1))
    assert c.colour_psnr == pytest.approx(23.88, abs=0.01)  # the stand-in's figure: the same held-out scenes
    assert c.ratio > 1.0, (c.vqgan_psnr, c.colour_psnr)

"""Encoding is deterministic by default, Gumbel sampling is seeded and batch-independent, and decode(encode(x))
has OFA's shape, dtype and range (spec §10.5.4–§10.5.5)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_scale.errors import UserError
from ofa_scale.vqgan import VQGAN, VQGANConfig, load_vqgan
from ofa_scale.vqgan.config import DDConfig
from ofa_scale.vqgan.images import to_pixels, to_uint8

sys.path.insert(0, str(Path(__file__).parent))
from vqgan_helpers import write_taming_dir  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_vqgan(write_taming_dir(tmp_path_factory.mktemp("vq") / "vq"), device="cpu")


@pytest.fixture(scope="module")
def images():
    gen = np.random.default_rng(0)
    return gen.integers(0, 256, size=(3, 32, 48, 3), dtype=np.uint8)


def test_default_codes_are_the_argmax_and_repeatable(model, images):
    codes = model.encode(images)
    assert codes.shape == (3, 4, 6) and codes.dtype == torch.int64
    assert torch.equal(codes, model.encode(images))
    with torch.no_grad():
        logits = model.quantize.proj(model.quant_conv(model.encoder(to_pixels(images))))
    assert torch.equal(codes, logits.argmax(dim=1))
    assert len(codes.unique()) > 1  # a real code map, not one constant code


def test_gumbel_sampled_codes_are_seeded_and_batch_independent(model, images):
    a = model.encode(images, sample=True, seeds=[7, 8, 9])
    assert torch.equal(a, model.encode(images, sample=True, seeds=[7, 8, 9]))
    assert torch.equal(a[1:2], model.encode(images[1:2], sample=True, seeds=[8]))  # alone = in its batch
    assert not torch.equal(a, model.encode(images, sample=True, seeds=[1, 2, 3]))
    assert not torch.equal(a, model.encode(images))  # sampling is not the argmax (OFA's codes are noisy)
    assert torch.equal(model.encode(images, sample=True, seeds=7), a)  # an int seeds image i with seed + i


def test_decode_of_encode_has_input_shape_and_uint8_range(model, images):
    codes = model.encode(images)
    out = model.decode(codes)
    assert out.shape == (3, 32, 48, 3) and out.dtype == torch.uint8
    flat = model.encode(images[:, :, :32])  # square grid: (N, h*w) raster codes decode the same
    assert torch.equal(model.decode(flat.reshape(3, -1)), model.decode(flat))
    pil = [Image.fromarray(a) for a in images]
    assert torch.equal(model.encode(pil), codes)  # PIL input = uint8 array input
    assert torch.equal(model.encode(to_pixels(images)), codes)  # and float [-1, 1] input


def test_rendering_clamps_and_truncates_like_ofa():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 3, 1, 2)
    got = to_uint8(x).permute(0, 3, 1, 2).reshape(-1).tolist()
    assert got == [0, 0, 127, 254, 255, 255]  # 127.5 -> 127 and 254.87 -> 254: truncation, not rounding


def test_bad_codes_and_images_are_user_errors(model, images):
    with pytest.raises(UserError, match=r"codes must lie in \[0, 63\]"):
        model.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(UserError, match="not a square grid"):
        model.decode(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(UserError, match="not a multiple"):
        model.encode(images[:, :30])


def test_nearest_code_vqgan_picks_the_closest_codebook_vector():
    torch.manual_seed(0)
    m = VQGAN(VQGANConfig(quantizer="vq", n_embed=16, embed_dim=8,
                          ddconfig=DDConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                            resolution=16, z_channels=8, norm_groups=4))).eval()
    z = torch.randn(2, 8, 3, 3)
    codes = m.quantize.codes(z)
    d = ((z.permute(0, 2, 3, 1)[..., None, :] - m.quantize.embedding.weight) ** 2).sum(-1)
    assert torch.equal(codes, d.argmin(-1))
    with pytest.raises(UserError, match="only for a Gumbel VQGAN"):
        m.encode(torch.zeros(1, 16, 16, 3, dtype=torch.uint8), sample=True)

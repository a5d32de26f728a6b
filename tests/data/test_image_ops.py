import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from ofa_scale.data.image_ops import (
    center_crop_offsets,
    decode_rgb,
    ofa_resize_size,
    random_resize_center_crop,
    random_resize_center_crop_tensor,
    to_uint8_tensor,
)


def _photo(size):
    return Image.fromarray(skdata.astronaut()).resize(size, Image.Resampling.BILINEAR)


def _jpeg(img, quality=90):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _naive(img, shorter, max_side=672, crop=384):
    ow, oh = ofa_resize_size(img.width, img.height, shorter, max_side)
    resized = img.resize((ow, oh), Image.Resampling.BICUBIC)
    left, top = center_crop_offsets(ow, oh, crop)
    return resized.crop((left, top, left + crop, top + crop))


def test_resize_size_follows_ofa_rule():
    assert ofa_resize_size(640, 480, 384, 672) == (512, 384)
    assert ofa_resize_size(480, 640, 400, 672) == (400, 533)  # longer side truncated, not rounded
    # Each side is clipped on its own, so a very wide image loses its aspect ratio.
    assert ofa_resize_size(2000, 500, 400, 672) == (672, 400)
    assert ofa_resize_size(500, 500, 480, None) == (480, 480)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1024, 768), (2000, 500)])
def test_crop_before_resize_matches_resize_then_crop(size):
    img = _photo(size)
    for seed in range(3):
        rng = random.Random(seed)
        shorter = random.Random(seed).choice(range(384, 481))
        fast = np.asarray(random_resize_center_crop(img, range(384, 481), 672, 384, rng), dtype=np.int16)
        naive = np.asarray(_naive(img, shorter), dtype=np.int16)
        assert fast.shape == naive.shape == (384, 384, 3)
        diff = np.abs(fast - naive)
        assert diff.max() <= 3, diff.max()
        assert diff.mean() < 0.2


@pytest.mark.parametrize("size", [(640, 480), (1024, 768), (350, 300), (3000, 500)])
def test_tensor_variant_matches_pillow_bicubic(size):
    img = _photo(size)
    for seed in range(3):
        shorter = random.Random(seed).choice(range(384, 481))
        fast = random_resize_center_crop_tensor(img, range(384, 481), 672, 384, random.Random(seed))
        assert fast.dtype == torch.uint8 and fast.shape == (3, 384, 384) and fast.is_contiguous()
        naive = torch.from_numpy(np.asarray(_naive(img, shorter), dtype=np.int16)).permute(2, 0, 1)
        diff = (fast.to(torch.int16) - naive).abs()
        assert diff.max() <= 2, diff.max()
        assert diff.float().mean() < 0.05


def test_random_resize_draws_from_choices_with_the_given_rng():
    img = _photo((800, 600))
    a = random_resize_center_crop(img, range(384, 481), 672, 384, random.Random(5))
    b = random_resize_center_crop(img, range(384, 481), 672, 384, random.Random(5))
    c = random_resize_center_crop(img, [384], 672, 384, random.Random(5))
    d = random_resize_center_crop(img, [480], 672, 384, random.Random(5))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(c), np.asarray(d))


def test_small_image_is_padded_like_center_crop():
    img = Image.new("RGB", (300, 100), (200, 10, 10))
    out = random_resize_center_crop(img, [120], None, 200, random.Random(0))  # resized to 360x120
    arr = np.asarray(out)
    assert out.size == (200, 200)
    assert arr[0, 100].tolist() == [0, 0, 0] and arr[100, 100, 0] > 150


def test_decode_rgb_draft_keeps_min_size_and_reports_factor():
    data = _jpeg(_photo((2048, 1536)))
    full, factor = decode_rgb(data)
    assert full.size == (2048, 1536) and factor == 1
    small, factor = decode_rgb(data, min_size=480)
    assert factor == 2 and small.size == (1024, 768) and small.mode == "RGB"
    smaller, factor = decode_rgb(data, min_size=190)
    assert factor == 8 and min(smaller.size) >= 190
    # The reduced decode is the same picture: compare with a plain downscale of the full decode.
    ref = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(small, dtype=np.int16) - ref).mean() < 4
    # Not much larger than needed: decoded in full.
    _, factor = decode_rgb(_jpeg(_photo((800, 600))), min_size=480)
    assert factor == 1


def test_decode_rgb_png_and_grey_become_rgb_untouched_by_draft():
    buf = io.BytesIO()
    Image.new("L", (1000, 1000), 77).save(buf, format="PNG")
    img, factor = decode_rgb(buf.getvalue(), min_size=100)
    assert img.mode == "RGB" and img.size == (1000, 1000) and factor == 1
    assert img.getpixel((5, 5)) == (77, 77, 77)


def test_to_uint8_tensor_layout():
    img = Image.new("RGB", (5, 3), (1, 2, 3))
    img.putpixel((4, 2), (250, 251, 252))
    t = to_uint8_tensor(img)
    assert t.dtype == torch.uint8 and t.shape == (3, 3, 5)
    assert t[:, 2, 4].tolist() == [250, 251, 252] and t[:, 0, 0].tolist() == [1, 2, 3]

"""The text-to-image sample data (data/sample_image_gen.py): the colour/shape oracle that the end-to-end test
(tests/finetune/test_image_gen_e2e.py) judges generated pictures with, on OFA's 32×32 code grid and on the 16×16
grid of `--image-gen-code-size 128`, and the code counts the sample writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_scale.data.sample_image_gen import (ColourCodec, judge, make_row, oracle, write_image_gen_corpus)
from ofa_scale.errors import UserError

ROWS = [make_row("test", i, 0) for i in range(40)]
CAPTIONS = [r.caption for r in ROWS]


def coded_pictures(size: int) -> list[np.ndarray]:
    """Each row's picture shrunk to size×size, quantised and decoded: what a model drawing the true codes draws."""
    codec = ColourCodec()
    pictures = []
    for row in ROWS:
        image = row.image if size == 256 else row.image.resize((size, size), Image.BOX)
        pictures.append(codec.decode(codec.encode(np.asarray(image)[None]))[0].numpy())
    return pictures


@pytest.mark.parametrize("size", [256, 128])
def test_the_oracle_scores_true_codes_right_and_random_codes_wrong(size):
    truth = oracle(coded_pictures(size), CAPTIONS)
    assert (truth.colour, truth.shape, truth.both) == (1.0, 1.0, 1.0)
    grid = size // 8
    codes = torch.randint(0, 8192, (len(ROWS), grid * grid), generator=torch.Generator().manual_seed(0))
    rand = oracle(list(ColourCodec().decode(codes).numpy()), CAPTIONS)
    assert rand.colour < 0.25 and rand.both < 0.1


def test_the_oracle_tells_each_shape_and_colour_of_the_caption():
    pictures = coded_pictures(128)
    for row, picture in zip(ROWS, pictures):
        assert judge(picture) == (row.colour, row.kind)
    assert judge(np.full((128, 128, 3), 132, dtype=np.uint8)) == (None, None)  # background only
    with pytest.raises(ValueError, match="square"):
        judge(np.zeros((128, 64, 3), dtype=np.uint8))


def test_the_code_size_sets_the_rows_code_count(tmp_path):
    paths = write_image_gen_corpus(tmp_path / "g", 3, 2, code_image_size=128)
    for path in paths.values():
        for line in path.read_text().splitlines():
            uid, codes, caption = line.split("\t")
            assert len(codes.split()) == 256 and caption
    default = write_image_gen_corpus(tmp_path / "d", 1, 1)
    assert len(default["image_gen_train.tsv"].read_text().split("\t")[1].split()) == 1024  # OFA's 32x32
    for bad in (100, 512, 0):
        with pytest.raises(UserError, match="--image-gen-code-size"):
            write_image_gen_corpus(tmp_path / "b", 1, 1, code_image_size=bad)


def test_the_cli_writes_a_smaller_grid_that_the_converter_accepts(tmp_path):
    from ofa_scale.cli.preprocess import main as preprocess
    from ofa_scale.data.tsv_formats import FORMATS, RowReject

    assert preprocess(["sample", "--out", str(tmp_path / "c"), "--rows", "1", "--finetune-images", "0",
                       "--text-rows", "0", "--image-gen-rows", "2", "--image-gen-eval-rows", "1",
                       "--image-gen-code-size", "128"]) == 0
    line = (tmp_path / "c" / "image_gen" / "image_gen_train.tsv").read_text().splitlines()[0]
    _, fields = FORMATS["image_gen"].parse(line.split("\t"), 1)
    assert len(fields["codes"]) == 256
    with pytest.raises(RowReject) as rejected:  # 3 codes fill no grid: the converter rejects the row
        FORMATS["image_gen"].parse(["g", "1 2 3", "a red circle"], 1)
    assert rejected.value.code == "bad_codes" and "square" in rejected.value.detail

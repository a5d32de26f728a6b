"""The text-to-image code grid as a config value (`task.extra.code_image_size`, finetune/image_gen.py): OFA's 256
(32×32 = 1024 codes) by default; a smaller grid shrinks the targets, the sampling and the pictures, and a model
drawn for another grid is refused in one sentence."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import ConfigError, UserError

sys.path.insert(0, str(Path(__file__).parent))
from image_gen_helpers import image_gen_task, tiny_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("sentencepiece", train_tokenizer(tmp_path_factory.mktemp("grid_tok")), num_bins=2)


def record(n_codes: int, caption: str = "a red circle", uid: str = "g-1") -> dict:
    return {"key": uid, "meta": {"uniq_id": uid, "codes": [i % 8192 for i in range(n_codes)], "caption": caption},
            "image": None}


def test_the_default_grid_is_ofas_and_a_smaller_one_shrinks_the_targets(tok):
    assert image_gen_task(tok).lengths()[1] == 1025 and image_gen_task(tok).grid == 32
    task = image_gen_task(tok, extra={"code_image_size": 128})
    assert (task.grid, task.codes_per_image, task.lengths()[1]) == (16, 256, 257)
    ex, = task.train_examples(record(256))
    assert len(ex["target"]) == 257 and len(ex["prev_output"]) == 257
    gen = task.generation_config(2)
    assert (gen.min_len, gen.max_len_b) == (256, 256)
    assert task.pictures(torch.zeros(3, 256, dtype=torch.long))[0].size == (128, 128)  # 16x16 colour patches
    with pytest.raises(UserError, match="needs 256 \\(16x16\\)"):
        task.train_examples(record(1024))


@pytest.mark.parametrize("extra, match", [({"code_image_size": 100}, "multiple of 8"),
                                          ({"code_image_size": "128"}, "multiple of 8"),
                                          ({"code_image_size": 0}, "multiple of 8"),
                                          ({"grid": 16}, "knows only code_image_size")])
def test_bad_grid_settings_are_config_errors(tok, extra, match):
    with pytest.raises(ConfigError, match=match):
        image_gen_task(tok, extra=extra)


def test_a_smaller_grid_samples_exactly_its_codes_and_refuses_another_models_grid(tok):
    task = image_gen_task(tok, samples=2, extra={"code_image_size": 64})  # 8x8: 64 codes
    items = [task.eval_item(record(64, caption=c, uid=str(i))) for i, c in enumerate(("a red circle", "a star"))]
    model = tiny_model(len(tok), code_image_size=64)
    preds = task.predict(model, items, device=torch.device("cpu"))
    for p in preds:
        assert p["codes"].shape == (2, 64) and int(p["codes"].min()) >= 0 and int(p["codes"].max()) < 8192
    with pytest.raises(UserError, match="code grid is 32x32.*8x8"):
        task.predict(tiny_model(len(tok)), items, device=torch.device("cpu"))

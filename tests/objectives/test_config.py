import pytest

from ofa_scale.errors import ConfigError
from ofa_scale.objectives import TASKS, ObjectivesConfig
from ofa_scale.utils.config import load_config


def test_defaults_are_ofa_pretraining_values():
    c = ObjectivesConfig()
    c.validate()
    assert c.tasks == list(TASKS) and c.mix == {"vl": 8, "text": 2, "image": 1, "detection": 1}
    assert (c.vl.image_size, c.aux.image_size, c.max_src_words, c.max_tgt_words) == (384, 256, 80, 30)
    assert (c.mask_ratio, c.poisson_lambda, c.num_bins, c.max_image_size, c.label_smoothing) == (0.3, 3.0, 1000, 512, 0.0)
    k = c.scaled
    assert (k.resize_min, k.resize_max, k.max_side, k.box_normaliser, k.infill_lo, k.infill_hi, k.sample_patch_num) == (
        384, 480, 672, 512, 64, 192, 196)
    assert c.decode_min_sizes() == {"vl": 480, "detection": 384, "image": 256}


def test_partial_overrides_keep_other_defaults():
    c = load_config(ObjectivesConfig, None, ["vl.image_size=128", "mix.text=4", "tasks=[caption,itm]"])
    assert (c.vl.image_size, c.vl.source_length, c.aux.image_size) == (128, 128, 256)
    assert c.mix == {"vl": 8, "text": 4, "image": 1, "detection": 1} and c.tasks == ["caption", "itm"]
    assert c.drop_worst_ratio_at(10) == 0.0


@pytest.mark.parametrize("override, message", [
    ("tasks=[captions]", "unknown task"),
    ("mix.audio=1", "unknown source"),
    ("mix.vl=0", "mix.vl must be > 0"),
    ("vl.image_size=100", "multiple of 16"),
    ("mask_ratio=1.5", "mask_ratio"),
    ("label_smoothing=-0.1", "label_smoothing"),
    ("loss_normalization=mean", "loss_normalization"),
])
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ObjectivesConfig, None, [override])

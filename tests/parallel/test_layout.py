import pytest

from ofa_scale.errors import ConfigError
from ofa_scale.model.config import OFAConfig
from ofa_scale.parallel.layout import ParallelConfig, pad_vocab, validate_layout

HUGE = OFAConfig.preset("ofa_huge")


def layout(world, **kw):
    return validate_layout(ParallelConfig(**kw), HUGE, world)


def test_valid_layout_derives_dp_and_pads_vocab():
    lay = layout(64, tp=8, pp=2, zero_stage=1)
    assert (lay.tp, lay.pp, lay.dp) == (8, 2, 4)
    assert lay.vocab_size == 59457 and lay.padded_vocab_size == 59464  # next multiple of 8
    assert lay.padded_vocab_size % 8 == 0
    assert layout(16, tp=2, zero_stage=3).dp == 8
    assert pad_vocab(59457, 4, 128) == 59904


def test_rank_coordinates_put_tp_fastest_then_dp_then_pp():
    lay = layout(8, tp=2, pp=2)
    assert [tuple(lay.coords(r).values()) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


@pytest.mark.parametrize("world,kw,needle", [
    (6, dict(tp=4), "not divisible by tp*pp"),
    (16, dict(tp=2, dp=4), "is not tp*pp*dp"),
    (6, dict(tp=3), "16 attention heads are not divisible by parallel.tp=3"),
    (64, dict(pp=64), "larger than the model's 36 transformer layers"),
    (8, dict(pp=2, zero_stage=2), "DeepSpeed pipelines support ZeRO-0/1 only"),
    (8, dict(pp=2, zero_stage=3), "set parallel.zero_stage=1 or parallel.pp=1"),
    (8, dict(pp=2, zero_stage=0), "set parallel.zero_stage=1"),
    (4, dict(zero_stage=4), "use 0, 1, 2 or 3"),
    (4, dict(tp=0), "positive integer"),
    (2, dict(tp=2, sequence_parallel=True), "set parallel.sequence_parallel=false"),
    (2, dict(pp=2, partition="explicit"), "needs parallel.stage_layers"),
    (2, dict(pp=2, partition="explicit", stage_layers=[10, 10]), "summing to the 39 pipeline layers"),
])
def test_invalid_layouts_fail_with_one_line_naming_the_fix(world, kw, needle):
    with pytest.raises(ConfigError) as e:
        layout(world, **kw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_ffn_not_divisible_is_reported():
    cfg = OFAConfig(d_model=96, ffn_dim=100, heads=8, encoder_layers=1, decoder_layers=1)
    with pytest.raises(ConfigError, match="FFN width 100 is not divisible by parallel.tp=8"):
        validate_layout(ParallelConfig(tp=8), cfg, 8)


def test_explicit_stage_split_accepted():
    lay = layout(2, pp=2, partition="explicit", stage_layers=[20, 19])
    assert lay.stage_layers == (20, 19)

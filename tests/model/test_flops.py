"""The analytic FLOP count equals what torch's FlopCounterMode measures on the math path."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.flops import resnet_forward_flops, step_flops

CFG = OFAConfig.preset("ofa_tiny", d_model=64, ffn_dim=128, heads=4, encoder_layers=2, decoder_layers=3,
                       attention_impl="math")


@pytest.mark.parametrize("size, sample", [(64, None), (96, 20), (None, None)])
def test_forward_flops_match_flop_counter(size, sample):
    torch.manual_seed(0)
    model = OFAModel(CFG).eval()
    b, s, t = 2, 7, 5
    images = None if size is None else torch.randn(b, 3, size, size)
    with FlopCounterMode(display=False) as counter:  # (its module tracker needs autograd on)
        model(src_tokens=torch.randint(4, 99, (b, s)), patch_images=images, patch_masks=None,
              prev_output_tokens=torch.randint(4, 99, (b, t)), sample_patch_num=sample)
    counted = step_flops(CFG, b, s, t, size, sample)
    assert counter.get_total_flops() == counted.forward
    assert counted.train_step == 3 * counted.forward


def test_resnet_grid_sizes_match_spec():
    cfg = OFAConfig.preset("ofa_base")
    for px, grid in [(256, 16), (384, 24), (480, 30), (512, 32)]:
        _, h, w = resnet_forward_flops(cfg, px, px)
        assert (h, w) == (grid, grid)

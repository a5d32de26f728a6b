"""The model takes its layers from the factory and keeps heads a first-class, TP-splittable dimension."""

import torch
from torch import nn

from ofa_scale.model import LayerFactory, OFAConfig, OFAModel

CFG = OFAConfig.preset("ofa_tiny", d_model=64, ffn_dim=128, heads=4, encoder_layers=1, decoder_layers=1)


class HalfShardFactory(LayerFactory):
    """Shapes of rank 0 at TP=2 with plain layers (no communication: checks shapes/head bookkeeping only)."""

    tp_size = 2
    tp_rank = 0

    def __init__(self):
        self.calls = []

    def column_linear(self, in_features, out_features, bias=True):
        self.calls.append(("column", in_features, out_features))
        return nn.Linear(in_features, out_features // self.tp_size, bias=bias)

    def row_linear(self, in_features, out_features, bias=True):
        self.calls.append(("row", in_features, out_features))
        return nn.Linear(in_features // self.tp_size, out_features, bias=bias)

    def ffn_layernorm(self, dim, eps=1e-5):
        return nn.LayerNorm(dim // self.tp_size, eps=eps)


def test_heads_and_tables_are_split_by_the_factory():
    factory = HalfShardFactory()
    model = OFAModel(CFG, layers=factory)
    sd = model.state_dict()
    assert sd["encoder.layers.0.self_attn.c_attn"].shape == (2,)
    assert sd["encoder.layers.0.self_attn.q_proj.weight"].shape == (32, 64)
    assert sd["encoder.layers.0.self_attn.out_proj.weight"].shape == (64, 32)
    assert sd["encoder.layers.0.fc1.weight"].shape == (64, 64)
    assert sd["encoder.layers.0.ffn_layernorm.weight"].shape == (64,)
    assert sd["encoder.token_rel_pos_table_list.0.weight"].shape == (511, 2)
    assert sd["decoder.image_rel_pos_table_list.0.weight"].shape == (6892, 2)
    assert sd["decoder.cross_pos_k_linear.weight"].shape == (32, 64)
    # q/k/v, fc1 and all pos linears are column-parallel; out_proj and fc2 row-parallel
    kinds = [c[0] for c in factory.calls]
    assert kinds.count("column") == (2 + 4) + (4 + 7) and kinds.count("row") == 2 + 3
    logits = model(src_tokens=torch.randint(4, 99, (2, 5)), patch_images=torch.randn(2, 3, 32, 32),
                   patch_masks=torch.ones(2, dtype=torch.bool), prev_output_tokens=torch.randint(4, 99, (2, 4)))
    assert logits.shape == (2, 4, CFG.vocab_size)


def test_output_projection_goes_through_the_factory():
    class CountingFactory(LayerFactory):
        calls = 0

        def output_logits(self, x, embedding):
            CountingFactory.calls += 1
            return super().output_logits(x, embedding)

    model = OFAModel(CFG, layers=CountingFactory())
    model(src_tokens=torch.randint(4, 99, (1, 5)), patch_images=None, patch_masks=None,
          prev_output_tokens=torch.randint(4, 99, (1, 3)))
    assert CountingFactory.calls == 1

"""The pipeline's layers, run one after another in one process, compute exactly what OFAModel computes.

They reuse the model's own bias functions and embed steps (no second copy of the relative-bias code), patch
sampling travels as an int64 [k, seed] input from which the embed stage rebuilds the generator pp = 1 draws from,
and the tied embedding is one module that DeepSpeed's checkpoint sees at both ends.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.layers import LayerFactory
from ofa_scale.parallel.pipeline import build_layer_specs
from ofa_scale.parallel.pipeline_layers import SharedEmbedding, pipeline_inputs

CFG = OFAConfig.preset("ofa_tiny", d_model=32, ffn_dim=64, heads=2, encoder_layers=2, decoder_layers=2,
                       vocab_size=300, attention_impl="math")


def _batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 300, (3, 9), generator=g)
    src[0, -2:] = CFG.pad_token_id
    prev = torch.randint(4, 300, (3, 7), generator=g)
    prev[1, -1] = CFG.pad_token_id
    return dict(src_tokens=src, patch_images=torch.randn(3, 3, 64, 64, generator=g),
                patch_masks=torch.tensor([True, False, True]), prev_output_tokens=prev)


def _chain():
    """(the unsplit model, the pipeline layers built from an identical copy, in pipeline order)."""
    torch.manual_seed(0)
    model = OFAModel(CFG).eval()
    specs = build_layer_specs(copy.deepcopy(model), LayerFactory())
    tied = {}
    layers = []
    for spec in specs:  # DeepSpeed builds a tied spec once and reuses the module
        key = getattr(spec, "key", None)
        if key is None:
            layers.append(spec.build())
        else:
            layers.append(tied.setdefault(key, spec.build()))
    for layer in layers:
        layer.eval()
    return model, layers


def _run(layers, inputs):
    x = inputs
    for layer in layers:
        x = layer(x)
    return x


@torch.no_grad()
@pytest.mark.parametrize("code", [False, True])
@pytest.mark.parametrize("spn", [0, 5])
def test_pipeline_layers_reproduce_the_model_exactly(spn, code):
    model, layers = _chain()
    batch = _batch()
    code_masks = torch.tensor([False, code, False])
    sampling = {}
    if spn:
        sampling = dict(sample_patch_num=spn, patch_generator=torch.Generator().manual_seed(1234))
    want = model(**batch, code_masks=code_masks, **sampling)
    if spn:  # the generator was drawn from; the pipeline gets a fresh one with the same seed
        sampling["patch_generator"] = torch.Generator().manual_seed(1234)
    got = _run(layers, pipeline_inputs(batch["src_tokens"], batch["patch_images"], batch["patch_masks"],
                                       batch["prev_output_tokens"], code_masks, **sampling))
    assert torch.equal(got, want)
    if spn:  # sampling took effect: other patches, other logits
        assert not torch.equal(got, model(**batch, code_masks=code_masks))


def test_sampling_travels_as_its_seed():
    gen = torch.Generator().manual_seed(2**62 + 7)
    inputs = pipeline_inputs(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, 16, 16), torch.tensor([True]),
                             torch.zeros(1, 2, dtype=torch.long), torch.tensor([False]), 3, gen)
    assert inputs[-1].dtype == torch.int64 and inputs[-1].tolist() == [3, 2**62 + 7]
    assert all(not t.is_floating_point() for i, t in enumerate(inputs) if i != 1)  # no gradient for masks/ids
    assert pipeline_inputs(*inputs[:2], torch.tensor([True]), *inputs[3:5])[-1].tolist() == [0, 0]
    with pytest.raises(ValueError, match="patch_generator"):
        pipeline_inputs(*inputs[:2], torch.tensor([True]), *inputs[3:5], 3, None)


def test_tied_embedding_is_one_module_with_a_state_dict_at_both_ends():
    _, layers = _chain()
    first, last = layers[0], layers[-1]
    assert isinstance(first, SharedEmbedding) and first is last
    # DeepSpeed saves each layer's state_dict; a forward_fn partial would have none and lose the embedding
    assert list(first.state_dict()) == ["embedding.weight"]


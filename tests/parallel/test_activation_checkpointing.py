"""parallel.activation_checkpointing on the plain model: each layer's forward runs again in backward, the
gradients are unchanged, and wrapping twice (ours, then the trainer's) does not recompute twice."""

import torch

from ofa_scale.model import OFAModel
from ofa_scale.training.prepare import apply_activation_checkpointing as checkpoint_layers
from parallel_workers import micro_batch, tiny_config


def run(model, calls):
    b = micro_batch(1, 0)
    logits = model(src_tokens=b["src_tokens"], patch_images=b["patch_images"], patch_masks=b["patch_masks"],
                   prev_output_tokens=b["prev_output_tokens"], code_masks=b["code_masks"])
    calls.clear()
    logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_layers_are_recomputed_in_backward_with_identical_gradients():
    torch.manual_seed(0)
    plain = OFAModel(tiny_config())
    torch.manual_seed(0)
    ckpt = OFAModel(tiny_config())
    checkpoint_layers(ckpt)
    checkpoint_layers(ckpt)  # idempotent
    calls = []
    layer = ckpt.encoder.layers[1]
    layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    want = run(plain, [])
    got = run(ckpt, calls)
    assert len(calls) == 1  # the backward recomputed encoder layer 1 exactly once
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)

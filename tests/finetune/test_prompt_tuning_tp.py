"""Prefix tuning under tensor parallelism (2 forked gloo ranks, tp=2): each rank's prefix tables hold exactly its
heads' columns of the single-process tables (split like the keys they join), and a training forward/backward with
only the prefix trainable gives the single process's loss and, rank by rank, its slice of the prefix gradients.
(The whole trainer under ZeRO-3 and TP: test_prompt_tuning_run.py.)"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from forked_ranks import run_forked  # noqa: E402

TP = 2
SEED = 5
VOCAB = 301


def config():
    from ofa_scale.model import OFAConfig

    return OFAConfig.preset("ofa_tiny", d_model=32, ffn_dim=64, heads=4, encoder_layers=1, decoder_layers=2,
                            vocab_size=VOCAB, encoder_prompt_length=3, decoder_prompt_length=2, prompt_dropout=0.0)


def batch() -> dict:
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, VOCAB, (2, 6), generator=g)
    src[1, -1] = 1
    return dict(src_tokens=src, patch_images=torch.randn(2, 3, 32, 32, generator=g),
                patch_masks=torch.tensor([True, False]),
                prev_output_tokens=torch.randint(4, VOCAB, (2, 5), generator=g),
                target=torch.randint(4, VOCAB, (2, 5), generator=g))


def step(model, losses) -> tuple[float, dict]:
    """One training forward/backward with only the prefix trainable -> (loss, {prefix name: grad})."""
    from ofa_scale.finetune.freeze import apply_prompt_freezing

    apply_prompt_freezing(model, "prefix")
    model.train()
    b = batch()
    logits = model(b["src_tokens"], b["patch_images"], b["patch_masks"], b["prev_output_tokens"])
    out = losses(logits, b["target"])
    loss = out.loss.sum() / out.valid.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    return float(loss), grads


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ofa_scale.parallel.context import setup_parallel
    from ofa_scale.parallel.layout import ParallelConfig, validate_layout
    from ofa_scale.training.prepare import build_module, materialise

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP,
                            timeout=datetime.timedelta(seconds=60))
    cfg = config()
    ctx = setup_parallel(validate_layout(ParallelConfig(tp=TP), cfg, TP))
    module, is_meta = build_module(ctx, cfg)
    model = materialise(ctx, module, cfg, SEED, is_meta)
    prefix = {n: p.detach().clone() for n, p in model.named_parameters() if ".prefix." in n}
    loss, grads = step(model, lambda logits, target: ctx.token_losses(logits, target, epsilon=0.1, ignore_index=1))
    torch.save({"loss": loss, "grads": grads, "prefix": prefix, "split": dict(ctx.split_params)},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_tp_prefix_is_split_by_heads_and_trains_like_one_process(tmp_path):
    from ofa_scale.model import OFAModel
    from ofa_scale.model.init import init_weights
    from ofa_scale.objectives.token_loss import SingleProcessTokenLoss

    model = OFAModel(config())
    init_weights(model, SEED)
    full = {n: p.detach().clone() for n, p in model.named_parameters() if ".prefix." in n}
    loss, grads = step(model, SingleProcessTokenLoss(0.1, 1))
    assert set(grads) == set(full) and len(full) == 2 * 3  # key + value in 1 encoder + 2 decoder self-attentions

    ranks = run_forked(_rank, TP, tmp_path)
    for rank, r in enumerate(ranks):
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
        for name, value in full.items():
            assert r["split"][name] == 1  # marked tensor-parallel along the heads' columns
            cols = slice(rank * 16, (rank + 1) * 16)  # 2 of 4 heads × head_dim 8
            assert torch.equal(r["prefix"][name], value[:, cols]), name
            torch.testing.assert_close(r["grads"][name], grads[name][:, cols], rtol=1e-4, atol=1e-7)

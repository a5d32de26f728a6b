import random

import pytest
import torch
from PIL import Image

from ofa_scale.objectives import (Collator, Composition, ObjectivesConfig, SingleProcessTokenLoss,
                                  global_loss_denominators, group_names, micro_batch_loss, to_model_inputs)
from ofa_scale.objectives.augment import OPS, apply_op, random_augment


class TinyModel(torch.nn.Module):
    """Stands in for OFAModel's call signature (docs/interfaces.md §5) and records what it was given."""

    def __init__(self, vocab=16, dim=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.img = torch.nn.Linear(3, dim)
        self.out = torch.nn.Linear(dim, vocab)
        self.calls = []

    def forward(self, src_tokens, patch_images, patch_masks, prev_output_tokens, code_masks=None, sample_patch_num=None):
        self.calls.append({"images": patch_images, "spn": sample_patch_num, "code_masks": code_masks})
        ctx = self.emb(src_tokens).mean(1) + self.img(patch_images.mean((2, 3))) * patch_masks[:, None]
        return self.out(self.emb(prev_output_tokens) + ctx[:, None])


def example(task, size, seed):
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randint(4, 16, (3,), generator=g).tolist()
    return {"task": task, "source": [0, 5, 6, 2], "prev_output": [0] + tgt, "target": tgt + [2], "conf": 2.0 if task == "detection" else 1.0,
            "patch_mask": True, "code_mask": False, "image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)}


def test_micro_batch_loss_wires_collated_groups_to_model_and_loss():
    cfg = ObjectivesConfig(mix={"vl": 1, "text": 0, "image": 0, "detection": 1}, tasks=["caption", "itm", "detection"])
    cfg.vl.image_size, cfg.aux.image_size, cfg.vl.target_length, cfg.aux.target_length = 32, 16, 6, 6
    batch = Collator(cfg, Composition.from_config(cfg, 1))([example("caption", 32, 1), example("itm", 32, 2),
                                                             example("detection", 16, 3)])
    model = TinyModel()
    groups = group_names(batch)
    assert global_loss_denominators([batch], groups, "global_tokens", 1) == {"vl": 12.0, "aux": 12.0}  # 4 + 4 + 4
    assert global_loss_denominators([batch], groups, "per_group", 1) == {"vl": 8.0, "aux": 4.0}
    den = global_loss_denominators([batch], groups, "global_tokens", 1)
    loss = SingleProcessTokenLoss(0.1, 1)
    logits = {g: model(**to_model_inputs(batch[g], "cpu", torch.float32)) for g in groups}
    total, token_losses = micro_batch_loss(loss, logits, batch, den)
    assert [c["images"].shape[-1] for c in model.calls] == [32, 16]
    assert all(c["images"].min() >= -1 and c["images"].max() <= 1 for c in model.calls)
    assert model.calls[0]["spn"] == 1 and model.calls[1]["spn"] is None  # round(196·(32/384)²) = 1
    with torch.no_grad():
        ref = 0.0
        for g in ("vl", "aux"):  # the conf weights of the collated batch reach the loss (detection: 2)
            lp = torch.log_softmax(logits[g].double(), -1) * batch[g]["conf"].double().view(-1, 1, 1)
            valid = batch[g]["target"] != 1
            nll = -lp.gather(-1, batch[g]["target"].unsqueeze(-1)).squeeze(-1)
            eps_i = 0.1 / (16 - 1)
            ref += ((1 - 0.1 - eps_i) * nll - eps_i * lp.sum(-1))[valid].sum().item()
            assert torch.equal(token_losses[g].valid, valid)
    assert total.item() == pytest.approx(ref / 12, rel=1e-5)
    total.backward()
    assert model.out.weight.grad.abs().sum() > 0


def test_each_augment_op_keeps_size_and_fills_grey():
    img = Image.effect_noise((64, 48), 40).convert("RGB")
    rng = random.Random(0)
    for op in OPS:
        out = apply_op(img, op, 7, 10.0, rng)
        assert out.size == (64, 48) and out.mode == "RGB"
    shifted = apply_op(Image.new("RGB", (64, 48), (0, 0, 0)), "TranslateX", 7, 10.0, random.Random(1))
    row = [shifted.getpixel((x, 10)) for x in range(64)]
    assert row.count((128, 128, 128)) == 7  # 7 px at magnitude 7 of 10 px, grey fill
    bright = apply_op(Image.new("RGB", (4, 4), (100, 100, 100)), "Brightness", 7, 10.0, rng)
    assert bright.getpixel((0, 0)) == (136, 136, 136)  # factor 0.1 + 1.8·0.7 = 1.36


def test_random_augment_deterministic_per_seed_and_varies_across_seeds():
    img = Image.effect_noise((48, 48), 40).convert("RGB")
    a = random_augment(img, random.Random("1/augment"))
    b = random_augment(img, random.Random("1/augment"))
    assert a.tobytes() == b.tobytes()
    outs = {random_augment(img, random.Random(f"{s}/augment")).tobytes() for s in range(30)}
    assert len(outs) > 5 and img.tobytes() in outs  # some records draw no op (or Identity)

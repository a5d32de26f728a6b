"""Behaviour of the whole model: padding invariance, code mode, incremental decoding, patch sampling, gradients."""

import pytest
import torch

from ofa_scale.model import OFAConfig, OFAModel

CFG = OFAConfig.preset("ofa_tiny", d_model=64, ffn_dim=128, heads=4, encoder_layers=2, decoder_layers=2,
                       attention_impl="math")
PAD = 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OFAModel(CFG).eval()


def _batch(b=3, s=8, t=7, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        src_tokens=torch.randint(4, 500, (b, s), generator=g),
        patch_images=torch.randn(b, 3, size, size, generator=g),
        patch_masks=torch.ones(b, dtype=torch.bool),
        prev_output_tokens=torch.randint(4, 500, (b, t), generator=g),
    )


def _pad_right(x, n):
    return torch.cat([x, torch.full((x.shape[0], n), PAD, dtype=x.dtype)], dim=1)


@torch.no_grad()
def test_source_padding_does_not_change_logits(model):
    batch = _batch()
    ref = model(**batch)
    padded = dict(batch, src_tokens=_pad_right(batch["src_tokens"], 5))
    torch.testing.assert_close(model(**padded), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_target_padding_does_not_change_real_positions(model):
    batch = _batch()
    ref = model(**batch)
    padded = dict(batch, prev_output_tokens=_pad_right(batch["prev_output_tokens"], 3))
    torch.testing.assert_close(model(**padded)[:, :7], ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_patch_mask_false_ignores_image(model):
    batch = _batch()
    batch["patch_masks"] = torch.tensor([True, False, True])
    ref = model(**batch)
    other = dict(batch, patch_images=batch["patch_images"].clone())
    other["patch_images"][1] = torch.randn(3, 48, 48)
    out = model(**other)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[1], model(**dict(other, patch_masks=torch.ones(3, dtype=torch.bool)))[1])


@torch.no_grad()
def test_mixed_code_batch_equals_separate_batches(model):
    batch = _batch()
    mixed = model(**batch, code_masks=torch.tensor([False, True, False]))
    text = model(**batch, code_masks=torch.zeros(3, dtype=torch.bool))
    code = model(**batch, code_masks=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(mixed[[0, 2]], text[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], code[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(text[1], code[1])


@torch.no_grad()
def test_code_rows_use_image_positions_and_code_layernorm():
    torch.manual_seed(1)
    model = OFAModel(CFG).eval()
    batch = _batch()
    masks = torch.tensor([False, True, False])
    ref = model(**batch, code_masks=masks)
    dec = model.decoder
    # text positions and the text input LN only reach text rows ...
    dec.embed_positions.weight.add_(torch.randn_like(dec.embed_positions.weight))
    dec.layernorm_embedding.weight.add_(torch.randn_like(dec.layernorm_embedding.weight))
    out = model(**batch, code_masks=masks)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], ref[0], atol=1e-3)
    # ... image positions, the image relative table and code_layernorm_embedding only reach code rows
    ref = out
    dec.embed_image_positions.weight.add_(torch.randn_like(dec.embed_image_positions.weight))
    out = model(**batch, code_masks=masks)
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[1], ref[1], atol=1e-3)
    ref = out
    # (random perturbations: a constant shift would cancel in softmax / LayerNorm)
    for module in (dec.image_rel_pos_table_list[0], dec.code_layernorm_embedding):
        module.weight.add_(torch.randn_like(module.weight))
        out = model(**batch, code_masks=masks)
        torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[1], ref[1], atol=1e-3)
        ref = out


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("code", [None, [False, True, False]])
@torch.no_grad()
def test_incremental_decoding_equals_full(model, impl, code):
    model.set_attention_impl(impl)
    batch = _batch()
    batch["src_tokens"][0, 6:] = PAD
    batch["patch_masks"] = torch.tensor([True, True, False])
    code_masks = None if code is None else torch.tensor(code)
    full = model(**batch, code_masks=code_masks)
    enc = model.encoder(src_tokens=batch["src_tokens"], patch_images=batch["patch_images"],
                        patch_masks=batch["patch_masks"])
    prev = batch["prev_output_tokens"]
    state: dict = {}
    steps = [model.decoder(prev[:, : t + 1], enc, code_masks=code_masks, incremental_state=state)
             for t in range(prev.shape[1])]
    assert all(s.shape == (3, 1, CFG.vocab_size) for s in steps)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # a multi-token prefix in one call, then single steps
    state = {}
    first = model.decoder(prev[:, :4], enc, code_masks=code_masks, incremental_state=state)
    rest = [model.decoder(prev[:, : t + 1], enc, code_masks=code_masks, incremental_state=state)
            for t in range(4, prev.shape[1])]
    torch.testing.assert_close(torch.cat([first] + rest, 1), full, rtol=1e-5, atol=1e-5)
    model.set_attention_impl("math")


@torch.no_grad()
def test_reorder_for_beam_search(model):
    batch = _batch()
    enc = model.encoder(src_tokens=batch["src_tokens"], patch_images=batch["patch_images"],
                        patch_masks=batch["patch_masks"])
    prev = batch["prev_output_tokens"]
    order = torch.tensor([2, 2, 0, 1])
    full = model.decoder(prev[order], model.reorder_encoder_out(enc, order))
    state: dict = {}
    model.decoder(prev[:, :3], enc, incremental_state=state)
    model.reorder_incremental_state(state, order)
    enc2 = model.reorder_encoder_out(enc, order)
    steps = [model.decoder(prev[order][:, : t + 1], enc2, incremental_state=state) for t in range(3, prev.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 3:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sample_patch_num_keeps_geometry_and_is_reproducible(model):
    batch = _batch(b=2, size=64)  # 4×4 grid
    enc = model.encoder
    x, pad, pos = enc.embed(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    g = torch.Generator().manual_seed(7)
    xs, pads, spos = enc.embed(batch["src_tokens"], batch["patch_images"], batch["patch_masks"], 6, g)
    assert xs.shape == (2, 6 + 8, 64) and pads.shape == (2, 14) and spos.image_position_ids.shape == (2, 6)
    # the kept patches are full-grid patches with their own position ids (not renumbered 1..k)
    order = spos.image_position_ids - 1  # ids r·42+c+1 with c < 4 -> flat index r·4+c
    order = (order // 42) * 4 + order % 42
    assert len(set(order[0].tolist())) == 6
    for b in range(2):
        torch.testing.assert_close(xs[b, :6], x[b, order[b]])
        torch.testing.assert_close(xs[b, 6:], x[b, 16:])
        full_bias = enc.layer_bias(1, pos)[b]
        idx = torch.cat([order[b], torch.arange(16, 24)])
        torch.testing.assert_close(enc.layer_bias(1, spos)[b], full_bias[:, idx][:, :, idx])
    g2 = torch.Generator().manual_seed(7)
    again = enc.embed(batch["src_tokens"], batch["patch_images"], batch["patch_masks"], 6, g2)[2]
    assert torch.equal(again.image_position_ids, spos.image_position_ids)
    logits = model(**batch, sample_patch_num=6, patch_generator=torch.Generator().manual_seed(7))
    assert logits.shape == (2, 7, CFG.vocab_size)


def test_image_grid_geometry():
    torch.manual_seed(0)
    model = OFAModel(CFG).eval()
    with torch.no_grad():
        _, pad, pos = model.encoder.embed(torch.randint(4, 50, (1, 5)), torch.randn(1, 3, 96, 64))
    assert pos.num_image_tokens == 6 * 4 and pad.shape == (1, 29)
    assert pos.image_position_ids[0, :5].tolist() == [1, 2, 3, 4, 43]


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(2)
    model = OFAModel(CFG.replace(dropout=0.1, encoder_drop_path_rate=0.1, decoder_drop_path_rate=0.1,
                                 resnet_drop_path_rate=0.1)).train()
    batch = _batch()
    logits = model(**batch, code_masks=torch.tensor([False, True, False]))
    logits.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    # the shared embedding collects gradient from the encoder input, decoder input and output projection
    assert model.encoder.embed_tokens.weight.grad.abs().sum() > 0


def test_train_mode_is_stochastic_eval_is_not():
    torch.manual_seed(3)
    model = OFAModel(CFG.replace(dropout=0.1, decoder_drop_path_rate=0.2))
    batch = _batch()
    model.train()
    assert not torch.allclose(model(**batch), model(**batch))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), model(**batch))


def test_oversized_images_and_patch_samples_raise_user_errors():
    from ofa_scale.errors import UserError

    with torch.device("meta"):  # shapes only: no real 700 px convolution runs
        big = OFAModel(CFG)
        with pytest.raises(UserError, match="resize images"):
            big.encoder.embed(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 3, 704, 704))
    torch.manual_seed(0)
    small = OFAModel(CFG).eval()
    with pytest.raises(UserError, match="sample_patch_num"), torch.no_grad():
        small.encoder.embed(torch.randint(4, 50, (1, 5)), torch.randn(1, 3, 32, 32), None, 5)
    with pytest.raises(UserError, match="normalised"), torch.no_grad():
        small.encoder.embed(torch.randint(4, 50, (1, 5)), torch.zeros(1, 3, 32, 32, dtype=torch.uint8))

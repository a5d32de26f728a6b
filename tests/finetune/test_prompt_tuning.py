"""Prompt tuning's model parts (spec-ext §10.3), in one process: the prefix enters self-attention exactly as §10.3.3
says (checked against a hand-written attention), survives incremental decoding, and only the tuned parameters
train; the parameter counts §10.3 gives for OFA's checkpoints; the config section's refusals."""

from __future__ import annotations

import pytest
import torch

from ofa_scale.errors import ConfigError
from ofa_scale.finetune.freeze import FROZEN_BN, apply_prompt_freezing
from ofa_scale.finetune.prompt_config import PromptTuningSection
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.prompt_tuning import from_ofa_prefix_layout, ofa_prefix_layout
from ofa_scale.objectives.token_loss import SingleProcessTokenLoss

V = 64


def tiny(**prompt) -> OFAModel:
    torch.manual_seed(0)
    return OFAModel(OFAConfig.preset("ofa_tiny", d_model=32, ffn_dim=64, heads=4, encoder_layers=2, decoder_layers=2,
                                     vocab_size=V, max_source_positions=32, max_target_positions=32,
                                     attention_impl="math", **prompt))


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (2, 6), generator=g)
    src[1, -2:] = 1  # padding in the second row: the key mask must grow by the prefix too
    return dict(src_tokens=src, patch_images=torch.randn(2, 3, 32, 32, generator=g),
                patch_masks=torch.tensor([True, False]), prev_output_tokens=torch.randint(4, V, (2, 5), generator=g))


def reference_attention(attn, x, bias, pad, causal):
    """§10.3.3 by hand: prefix k/v (no projection) before the projected keys, no bias on the prefix columns,
    prefix never masked."""
    b, t, _ = x.shape
    h, hd = attn.local_heads, attn.head_dim
    heads = lambda y: y.view(b, -1, h, hd).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q_proj(x) * attn.scaling), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    n = attn.prefix.length
    pk = attn.prefix.key.weight.view(n, h, hd).transpose(0, 1).expand(b, -1, -1, -1)
    pv = attn.prefix.value.weight.view(n, h, hd).transpose(0, 1).expand(b, -1, -1, -1)
    scores = q @ torch.cat([pk, k], 2).transpose(-1, -2)
    scores[..., n:] += bias
    masked = torch.zeros(b, 1, t, n + t, dtype=torch.bool)
    if pad is not None:
        masked[..., n:] |= pad[:, None, None, :]
    if causal:
        masked[..., n:] |= torch.ones(t, t, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
    out = (probs @ torch.cat([pv, v], 2)) * attn.c_attn.view(1, -1, 1, 1)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * hd))


@pytest.mark.parametrize("causal", [False, True])
def test_prefix_attention_matches_the_spec_by_hand(causal):
    model = tiny(encoder_prompt_length=3, decoder_prompt_length=3).eval()
    attn = (model.decoder if causal else model.encoder).layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    x, bias = torch.randn(2, 5, 32, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        got = attn(x, bias=bias, key_padding_mask=pad, causal_offset=0 if causal else None)
        want = reference_attention(attn, x, bias, pad, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_prefix_changes_the_output_and_cross_attention_has_none():
    model = tiny(encoder_prompt_length=3, decoder_prompt_length=2).eval()
    assert all(layer.encoder_attn.prefix is None for layer in model.decoder.layers)
    with torch.no_grad():
        before = model(**inputs())
        model.encoder.layers[1].self_attn.prefix.value.weight.add_(1.0)
        assert not torch.allclose(model(**inputs()), before)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_incremental_decoding_with_prefixes_equals_the_full_forward(impl):
    """The prefix is re-prepended at every step and never enters the cache (§10.3.3 step 2)."""
    model = tiny(encoder_prompt_length=3, decoder_prompt_length=4, adapter_dim=8).eval()
    model.set_attention_impl(impl)
    x = inputs()
    with torch.no_grad():
        full = model(**x)
        enc = model.encoder(x["src_tokens"], x["patch_images"], x["patch_masks"])
        state: dict = {}
        prev = x["prev_output_tokens"]
        steps = [model.decoder(prev[:, :t + 1], enc, incremental_state=state)[:, -1] for t in range(prev.shape[1])]
    assert state["decoder.layers.0"]["self_attn"]["k"].shape[2] == prev.shape[1]  # no prefix in the cache
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_adapter_is_an_internal_residual_after_fc2():
    model = tiny(adapter_dim=8).eval()
    x = inputs()
    with torch.no_grad():
        with_zero_up = [layer.adapter.up_proj for layer in [*model.encoder.layers, *model.decoder.layers]]
        for up in with_zero_up:  # up_proj = 0: the adapter is the identity, so the model is the base model
            up.weight.zero_()
            up.bias.zero_()
        base = tiny().eval()
        base.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter." not in k})
        torch.testing.assert_close(model(**x), base(**x))
        with_zero_up[0].bias.fill_(0.5)
        assert not torch.allclose(model(**x), base(**x))


def snapshot(model) -> dict:
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.mark.parametrize("kind,prompt", [("prefix", dict(encoder_prompt_length=2, decoder_prompt_length=2)),
                                         ("adapter", dict(adapter_dim=4)), ("bitfit", {})])
def test_after_steps_every_base_weight_is_bit_identical_and_the_tuned_ones_moved(kind, prompt):
    model = tiny(**prompt)
    counts = apply_prompt_freezing(model, kind)
    assert counts["trainable"] > 0 and counts["frozen"] > 0
    assert all(getattr(m, FROZEN_BN, False) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = SingleProcessTokenLoss(0.1, 1)
    for s in range(3):
        model.train()
        x = inputs(s)
        logits = model(**x)
        loss_fn(logits, torch.randint(4, V, x["prev_output_tokens"].shape)).loss.sum().backward()
        opt.step()
        opt.zero_grad()
    after = snapshot(model)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert tuned and sum(p.numel() for n, p in model.named_parameters() if n in tuned) == counts["trainable"]
    for name, value in after.items():
        if name in tuned:
            assert not torch.equal(value, before[name]), f"{name} did not move"
        else:
            assert torch.equal(value, before[name]), f"base {name} changed"


def test_parameter_counts_of_ofa_checkpoints():
    """§10.3.2 / §10.3.4 / §10.3.5: prefix 4,915,200 on ofa_large (L_p 100), BitFit 70,656 on ofa_base, adapters
    (r 100) 4,942,176 on ofa_large."""
    def trainable(arch, kind, **prompt):
        with torch.device("meta"):
            model = OFAModel(OFAConfig.preset(arch, **prompt))
        return apply_prompt_freezing(model, kind)["trainable"]

    assert trainable("ofa_large", "prefix", encoder_prompt_length=100, decoder_prompt_length=100) == 4_915_200
    assert trainable("ofa_base", "bitfit") == 70_656
    assert trainable("ofa_large", "bitfit") == 186_368
    assert trainable("ofa_large", "adapter", adapter_dim=100) == 4_942_176


def test_ofa_prefix_layout_round_trip():
    model = tiny(encoder_prompt_length=3)
    state = model.state_dict()
    ofa = ofa_prefix_layout(state, "encoder", 2)
    assert ofa.shape == (3, 2 * 2 * 32)  # OFA's [L_p, 2·n_layers·d]
    # OFA views it as (L_p, 2·n_l, H, hd): row block 2 is layer 1's key
    assert torch.equal(ofa.view(3, 4, 4, 8)[:, 2].reshape(3, 32), state["encoder.layers.1.self_attn.prefix.key.weight"])
    back = from_ofa_prefix_layout(ofa, "encoder", 2)
    assert all(torch.equal(v, state[k]) for k, v in back.items()) and len(back) == 4


def test_model_overrides_and_refusals():
    section = PromptTuningSection(kind="prefix", length=7, decoder=False)
    assert section.model_overrides() == {"encoder_prompt_length": 7, "decoder_prompt_length": 0,
                                         "prompt_dropout": 0.2, "adapter_dim": 0}
    assert PromptTuningSection(kind="adapter", adapter_dim=100).model_overrides()["adapter_dim"] == 100
    assert PromptTuningSection(kind="bitfit").model_overrides() == PromptTuningSection().model_overrides() | {
        "encoder_prompt_length": 0, "decoder_prompt_length": 0}


@pytest.mark.parametrize("change,message", [
    ({"model.prompt_tuning.projection": "true"}, "projection"),
    ({"model.pretrained": "null"}, "model.pretrained"),
    ({"train.freeze_resnet": "true"}, "redundant"),
])
def test_config_refusals_are_one_sentence(tmp_path, change, message):
    from ofa_scale.training.config import load_training_config
    from tests.finetune.engine_data import write_config

    base = tmp_path / "base"
    base.mkdir()
    cfg = {"model": {"arch": "ofa_tiny", "pretrained": str(base), "prompt_tuning": {"kind": "prefix"}},
           "data": {"train": "t", "valid": "v", "tokenizer": {"path": "x"}},
           "task": {"name": "caption"}, "train": {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 2},
           "logging": {"mlflow": False}}
    path = write_config(tmp_path / "c.yaml", cfg)
    load_training_config(path)  # valid as written
    with pytest.raises(ConfigError, match=message):
        load_training_config(path, [f"{k}={v}" for k, v in change.items()])


def test_prefix_dropout_masks_each_row_independently():
    model = tiny(encoder_prompt_length=50)
    prefix = model.encoder.layers[0].self_attn.prefix
    prefix.train()
    k, _ = prefix(2, torch.float32)
    assert not torch.equal(k[0] == 0, k[1] == 0)
    assert (k == 0).float().mean().item() == pytest.approx(0.2, abs=0.05)
    prefix.eval()
    k, _ = prefix(2, torch.float32)
    assert torch.equal(k[0], k[1]) and torch.equal(k[0].transpose(0, 1).reshape(50, 32), prefix.key.weight)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_fast_candidate_scoring_equals_the_naive_path_with_prefixes(impl):
    """SNLI-VE / VQA all-candidate inference: model/candidates.py assembles self-attention caches itself; the prefix,
    kept out of every cache, must still be seen by each query exactly once."""
    from ofa_scale.model.generate import score_candidates, score_candidates_naive

    model = tiny(encoder_prompt_length=3, decoder_prompt_length=4).eval()
    model.set_attention_impl(impl)
    with torch.no_grad():  # prefixes large enough to matter
        for name, p in model.named_parameters():
            if ".prefix." in name:
                p.mul_(100)
    x = inputs()
    batch = {k: x[k] for k in ("src_tokens", "patch_images", "patch_masks")}
    candidates = [[10, 11], [10, 12, 13], [14], [15, 16, 17, 18], [10, 11, 19]]
    prompts = [[0, 20, 21], [0]]
    with torch.no_grad():
        fast = score_candidates(model, batch, candidates, decoder_prompts=prompts)
        naive = score_candidates_naive(model, batch, candidates, decoder_prompts=prompts)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-4)
    for layer in model.decoder.layers:  # the same scores without the decoder prefix are clearly different
        layer.self_attn.prefix = None
    with torch.no_grad():
        without = score_candidates_naive(model, batch, candidates, decoder_prompts=prompts)
    assert (without - naive).abs().max() > 1e-2

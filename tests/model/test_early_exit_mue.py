"""MuE's modality-decomposed encoder (model/mue_encoder.py) and its per-stream exits (model/early_exit.py).

The decomposed encoder must equal the joint encoder with image↔text attention cut (a -1e9 bias on the two cross
blocks), use OFA's state dict unchanged, and exit each stream at its own threshold. The guards refuse exits that
could desynchronise ranks (ZeRO-3 partitions, a pipeline stage) and separate thresholds on a joint encoder.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model import early_exit as ee
from ofa_scale.model.early_exit import EarlyExitConfig
from ofa_scale.model.encoder import OFAEncoder
from ofa_scale.model.generate import score_candidates, score_candidates_naive

PAD = 1


def _config(**kw) -> OFAConfig:
    return OFAConfig.preset("ofa_tiny", attention_impl="math", d_model=64, ffn_dim=128, vocab_size=2000, **kw)


@pytest.fixture(scope="module")
def mue_model() -> OFAModel:
    torch.manual_seed(0)
    return OFAModel(_config(mue=True)).eval()


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(7)
    return dict(src_tokens=torch.tensor([[0, 11, 12, 13, 14, 2], [0, 21, 22, 2, PAD, PAD], [0, 31, 32, 33, 2, PAD]]),
                patch_images=torch.randn(3, 3, 32, 32, generator=g), patch_masks=torch.tensor([True, True, False]))


PREV = torch.tensor([[0, 5, 6, 7], [0, 8, 9, PAD], [0, 10, 11, 12]])


def _joint_twin(model: OFAModel) -> OFAModel:
    """The same weights as an ordinary OFA model (joint encoder)."""
    twin = copy.deepcopy(model)
    twin.config.mue = False
    return twin


def _cut_cross_blocks(monkeypatch) -> None:
    """The joint encoder's layer bias with the image×text and text×image blocks at -1e9: no cross attention."""
    real = OFAEncoder.layer_bias

    def cut(self, i, pos):
        bias = real(self, i, pos).clone()
        n = pos.num_image_tokens
        bias[:, :, :n, n:] = -1e9
        bias[:, :, n:, :n] = -1e9
        return bias

    monkeypatch.setattr(OFAEncoder, "layer_bias", cut)


def _logits(model, batch, **kw):
    return model(src_tokens=batch["src_tokens"], patch_images=batch["patch_images"],
                 patch_masks=batch["patch_masks"], prev_output_tokens=PREV, **kw)


def test_decomposed_encoder_is_the_joint_encoder_without_image_text_attention(mue_model, batch, monkeypatch):
    twin = _joint_twin(mue_model)
    with torch.no_grad():
        out = mue_model.encoder(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
        joint = twin.encoder(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
        logits = _logits(mue_model, batch)
        joint_logits = _logits(twin, batch)
        _cut_cross_blocks(monkeypatch)
        ref = twin.encoder(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
        ref_logits = _logits(twin, batch)
    keep = ~out.padding_mask  # padded positions (sample 3's whole image stream) are never read by the decoder
    torch.testing.assert_close(out.states[keep], ref.states[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.padding_mask, joint.padding_mask)
    assert torch.equal(out.position_embeddings, joint.position_embeddings)  # [image_pos_ln ; pos_ln]
    assert (logits - joint_logits).abs().max() > 1e-3  # cutting the cross attention does change the model
    # the text stream alone is the joint encoder on the text without an image
    with torch.no_grad():
        text_only = mue_model.encoder(batch["src_tokens"])
    n = out.num_image_tokens
    text_keep = keep[:, n:]
    torch.testing.assert_close(out.states[:, n:][text_keep], text_only.states[text_keep], rtol=1e-5, atol=1e-5)


def test_mue_keeps_ofas_state_dict():
    torch.manual_seed(0)
    plain = OFAModel(_config()).state_dict()
    torch.manual_seed(0)
    mue = OFAModel(_config(mue=True)).state_dict()
    assert list(plain) == list(mue)
    assert all(plain[k].shape == mue[k].shape and torch.equal(plain[k], mue[k]) for k in plain)


def test_all_layer_logits_are_each_layers_projection(mue_model, batch):
    with torch.no_grad():
        per_layer = _logits(mue_model, batch, all_layers=True)
        last = _logits(mue_model, batch)
        short = copy.deepcopy(mue_model)
        short.decoder.layers = short.decoder.layers[:1]
        first = _logits(short, batch)
    assert len(per_layer) == len(mue_model.decoder.layers)
    assert torch.equal(per_layer[-1], last)
    torch.testing.assert_close(per_layer[0], first, rtol=1e-5, atol=1e-5)


def _streams(model, batch, cfg):
    ee.enable(model, cfg)
    try:
        with torch.no_grad():
            out = model.encoder(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
    finally:
        ee.enable(model, None)
    n = out.num_image_tokens
    return out.states[:, :n], out.states[:, n:], ~out.padding_mask[:, :n], ~out.padding_mask[:, n:]


def test_image_and_text_streams_exit_at_their_own_thresholds(mue_model, batch):
    full_img, full_txt, img_keep, txt_keep = _streams(mue_model, batch, None)
    short = copy.deepcopy(mue_model)
    short.encoder.layers = short.encoder.layers[:1]
    one_img, one_txt, _, _ = _streams(short, batch, None)

    image_exits = EarlyExitConfig(image=-1.0, text=1.0)
    img, txt, _, _ = _streams(mue_model, batch, image_exits)
    torch.testing.assert_close(img[img_keep], one_img[img_keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(txt, full_txt)
    summary = image_exits.stats.summary()
    assert summary["image_layers_mean"] == 1.0 and summary["text_layers_fraction"] == 1.0

    text_exits = EarlyExitConfig(image=1.0, text=-1.0)
    img, txt, _, _ = _streams(mue_model, batch, text_exits)
    assert torch.equal(img, full_img)
    torch.testing.assert_close(txt[txt_keep], one_txt[txt_keep], rtol=1e-5, atol=1e-5)
    assert text_exits.stats.summary()["text_layers_mean"] == 1.0
    assert "encoder_layers_mean" not in text_exits.stats.summary()  # no joint stream ran


def test_stream_exits_per_sample_match_one_at_a_time(mue_model, batch):
    """Thresholds inside the samples' cosine gaps (random model: image stream cosines 0.713/0.704 after layer 1,
    text 0.637/0.691/0.672): they stop at different layers in each stream, as when run alone."""
    cfg = dict(image=0.709, text=0.68)
    together = EarlyExitConfig(**cfg)
    img, txt, img_keep, _ = _streams(mue_model, batch, together)
    counts = {"image": [], "text": []}
    for b in range(3):
        length = int(batch["src_tokens"][b].ne(PAD).sum())
        one = {"src_tokens": batch["src_tokens"][b:b + 1, :length], "patch_images": batch["patch_images"][b:b + 1],
               "patch_masks": batch["patch_masks"][b:b + 1]}
        single = EarlyExitConfig(**cfg)
        one_img, one_txt, _, _ = _streams(mue_model, one, single)
        if bool(img_keep[b].any()):  # sample 3 has no image: its image stream is padding, never computed
            torch.testing.assert_close(one_img[0], img[b], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one_txt[0], txt[b, :length], rtol=1e-4, atol=1e-4)
        for part in counts:
            counts[part].append(single.stats.layers[part])
    assert counts == {"image": [1, 2, 0], "text": [2, 1, 2]}
    assert together.stats.layers["image"] == 3 and together.stats.units["image"] == 2  # samples with an image
    assert together.stats.layers["text"] == 5 and together.stats.units["text"] == 3


def test_joint_encoder_refuses_separate_thresholds_and_guards_refuse_partitioned_or_partial_models(mue_model):
    joint = _joint_twin(mue_model)
    with pytest.raises(ConfigError, match="decomposed encoder"):
        ee.enable(joint, EarlyExitConfig(image=0.99, text=0.7))
    ee.enable(joint, EarlyExitConfig(encoder=0.9))  # one threshold is fine
    ee.enable(joint, None)
    zero3 = copy.deepcopy(mue_model)
    next(zero3.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    with pytest.raises(UserError, match="ZeRO-3"):
        ee.enable(zero3, EarlyExitConfig(encoder=0.9))
    ee.enable(zero3, None)  # switching exits off is always allowed
    with pytest.raises(UserError, match="pipeline stage"):
        ee.enable(torch.nn.Sequential(copy.deepcopy(mue_model.decoder.layers[0])), EarlyExitConfig(encoder=0.9))


def test_all_candidate_scoring_takes_the_decoder_path_when_the_decoder_exits(mue_model, batch):
    """SNLI-VE's all-candidate evaluation with MuE's decoder_thres: the decoder's own loop, so the exits apply
    (here always after one layer = the one-layer decoder)."""
    cands = [[40], [41, 42], [43]]
    prompts = [[0, 7, 8], [0, 9], [0, 10, 11]]
    ee.enable(mue_model, EarlyExitConfig(image=1.0, text=1.0, decoder=-1.0))
    try:
        got = score_candidates(mue_model, batch, cands, decoder_prompts=prompts)
    finally:
        ee.enable(mue_model, None)
    short = copy.deepcopy(mue_model)
    short.decoder.layers = short.decoder.layers[:1]
    want = score_candidates_naive(short, batch, cands, decoder_prompts=prompts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    full = score_candidates(mue_model, batch, cands, decoder_prompts=prompts)
    assert not torch.allclose(full, want, atol=1e-3)


def test_mue_training_is_refused_under_pipeline_parallelism():
    from ofa_scale.training.config import TrainingConfig
    from ofa_scale.utils.config import from_dict

    cfg = from_dict(TrainingConfig, {"model": {"arch": "ofa_tiny", "overrides": {"mue": True}},
                                     "parallel": {"pp": 2}})
    with pytest.raises(ConfigError, match="mue"):
        cfg.validate()

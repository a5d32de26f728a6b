"""A taming-format VQGAN checkpoint (key list of spec §10.5.3) loads strictly and safely; bad ones are refused."""

import os
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.vqgan import VQGAN, VQGANConfig, load_vqgan

sys.path.insert(0, str(Path(__file__).parent))
from vqgan_helpers import SMALL_YAML, synthesised_state, taming_gumbel_shapes, write_taming_dir  # noqa: E402


def test_full_size_layout_is_ofas_gumbel_vqgan():
    """The default config (OFA's model.yaml) has exactly the 301 tensors / 68,995,971 parameters of §10.5.3."""
    with torch.device("meta"):
        sd = VQGAN(VQGANConfig()).state_dict()
    dd = {"ch": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32], "resolution": 256,
          "z_channels": 256}
    assert {k: tuple(v.shape) for k, v in sd.items()} == taming_gumbel_shapes(dd, 8192, 256)
    counts = {p: sum(1 for k in sd if k.startswith(p)) for p in ("encoder.", "decoder.", "quantize.")}
    assert counts == {"encoder.": 126, "decoder.": 168, "quantize.": 3}
    assert sum(v.numel() for v in sd.values()) == 68_995_971
    assert tuple(sd["decoder.up.2.block.0.nin_shortcut.weight"].shape) == (256, 512, 1, 1)


def test_synthesised_checkpoint_loads_every_tensor(tmp_path):
    state = synthesised_state(seed=3)
    model = load_vqgan(write_taming_dir(tmp_path / "vq", state), device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert set(loaded) == set(state)  # the discriminator (`loss.*`) was left out, nothing else
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert model.config.quantizer == "gumbel" and model.downsample_factor == 8


def test_lightning_callback_class_keys_are_read_without_importing_lightning(tmp_path, monkeypatch):
    """Old Lightning pickles `callbacks` keyed by the callback class; that name is admitted as an inert type."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    callbacks = {ModelCheckpoint: {"best_model_score": torch.tensor(0.3)}}
    d = write_taming_dir(tmp_path / "vq", extra={"callbacks": callbacks})
    monkeypatch.delitem(sys.modules, mod.__name__)
    assert load_vqgan(d, device="cpu").n_embed == 64


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    d = write_taming_dir(tmp_path / "vq", extra={"hyper_parameters": Evil()})
    with pytest.raises(UserError, match="refusing to load"):
        load_vqgan(d, device="cpu")
    assert not (tmp_path / "pwned").exists()


def test_missing_tensor_is_refused_with_its_name(tmp_path):
    state = synthesised_state()
    del state["decoder.up.1.upsample.conv.weight"]
    with pytest.raises(UserError, match=r"lacks 1 tensor.*decoder\.up\.1\.upsample\.conv\.weight.*do not belong"):
        load_vqgan(write_taming_dir(tmp_path / "vq", state), device="cpu")


def test_extra_tensor_is_refused_with_its_name(tmp_path):
    state = synthesised_state()
    state["encoder.down.3.attn.2.q.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(UserError, match=r"no place for.*encoder\.down\.3\.attn\.2\.q\.weight"):
        load_vqgan(write_taming_dir(tmp_path / "vq", state), device="cpu")


def test_shape_mismatch_is_refused(tmp_path):
    doc = yaml.safe_load(yaml.safe_dump(SMALL_YAML))
    doc["model"]["params"]["n_embed"] = 128  # the yaml no longer describes the checkpoint
    with pytest.raises(UserError, match=r"quantize\.embed\.weight \(64, 32\) vs \(128, 32\)"):
        load_vqgan(write_taming_dir(tmp_path / "vq", doc=doc), device="cpu")


def test_unusable_directories_and_configs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_vqgan(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.yaml").write_text(yaml.safe_dump(SMALL_YAML))
    with pytest.raises(UserError, match="lacks last.ckpt"):
        load_vqgan(tmp_path / "half")
    doc = yaml.safe_load(yaml.safe_dump(SMALL_YAML))
    doc["model"]["target"] = "taming.models.cond_transformer.Net2NetTransformer"
    with pytest.raises(ConfigError, match="not a taming GumbelVQ or VQModel"):
        load_vqgan(write_taming_dir(tmp_path / "vq", doc=doc))
    (tmp_path / "vq" / "last.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "vq" / "model.yaml").write_text(yaml.safe_dump(SMALL_YAML))
    with pytest.raises(UserError, match="not a torch checkpoint"):
        load_vqgan(tmp_path / "vq")

"""`ofa-convert import-ofa` of OFA's own prompt-tuned checkpoints (issue 13 §3, spec §10.3).

The checkpoints are synthesised with §10.3's key names and shapes: a whole model plus, for prefix tuning, one
`{side}.{side}_prompt_encoder.embedding.weight` [L_p, 2·layers·d] per side (fp16, as OFA saves), with the run's
`--encoder-prompt --decoder-prompt --*-prompt-length` args; for adapters `{side}.layers.{i}.adapter.*` with
`--adapter --adapter-dim`. The expected per-layer tables are cut out of OFA's table by §10.3.3's rule by hand
(view (L_p, 2·n_l, H, d/H), layer i takes chunk i of 2: key = block 2i, value = block 2i+1), not by the converter.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from ofa_scale.cli.convert_ckpt import main as convert_main
from ofa_scale.errors import UserError
from ofa_scale.model import OFAConfig
from ofa_scale.model.checkpoint import (CONFIG_FILE, TIED_EMBEDDING_KEYS, WEIGHTS_FILE, load_pretrained,
                                        read_fairseq_checkpoint)
from tests.model.test_import_ofa_cn import synthetic_state

D, LAYERS, L_P, R, VOCAB = 32, 2, 3, 5, 600
ARGS = dict(arch="ofa_tiny", encoder_embed_dim=D, decoder_embed_dim=D, encoder_ffn_embed_dim=64,
            decoder_ffn_embed_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=LAYERS,
            decoder_layers=LAYERS, resnet_type="resnet50", token_bucket_size=256, image_bucket_size=42,
            max_source_positions=1024, max_target_positions=1024, scale_attn=True, scale_fc=True, scale_heads=True,
            disable_entangle=True, share_all_embeddings=True, encoder_normalize_before=True,
            decoder_normalize_before=True)
PREFIX_ARGS = dict(encoder_prompt=True, decoder_prompt=True, encoder_prompt_type="prefix",
                   decoder_prompt_type="prefix", encoder_prompt_length=L_P, decoder_prompt_length=L_P,
                   encoder_prompt_projection=False, decoder_prompt_projection=False)
ADAPTER_ARGS = dict(adapter=True, adapter_dim=R)


def base_state(**config) -> dict[str, torch.Tensor]:
    """Every stored key of the shrunk architecture (with `config`'s added tensors), fp16, the embedding tied 3x."""
    return synthetic_state(OFAConfig.preset("ofa_tiny", d_model=D, ffn_dim=64, heads=2, encoder_layers=LAYERS,
                                            decoder_layers=LAYERS, resnet="resnet50", vocab_size=VOCAB, **config))


def ofa_prefix_state() -> dict[str, torch.Tensor]:
    state = base_state()
    g = torch.Generator().manual_seed(1)
    for side in ("encoder", "decoder"):
        state[f"{side}.{side}_prompt_encoder.embedding.weight"] = (torch.randn(L_P, 2 * LAYERS * D, generator=g)
                                                                   * 0.02).half()
    return state


def save_ofa(path, state, extra_args, with_args=True):
    cfg = {"common": {"fp16": True}, "model": argparse.Namespace(**ARGS, **extra_args), "task": {"_name": "refcoco"}}
    torch.save({"args": None, "model": state, "extra_state": {"epoch": 1}, "last_optimizer_state": None,
                **({"cfg": cfg} if with_args else {})}, path)
    return path


def expected_prefix_tables(state) -> dict[str, torch.Tensor]:
    out = {}
    for side in ("encoder", "decoder"):
        table = state[f"{side}.{side}_prompt_encoder.embedding.weight"].float().view(L_P, 2 * LAYERS, D)
        for i in range(LAYERS):
            out[f"{side}.layers.{i}.self_attn.prefix.key.weight"] = table[:, 2 * i]
            out[f"{side}.layers.{i}.self_attn.prefix.value.weight"] = table[:, 2 * i + 1]
    return out


@pytest.mark.parametrize("with_args", [True, False], ids=["args", "shapes"])
def test_a_prefix_tuned_checkpoint_imports_strictly(tmp_path, with_args):
    state = ofa_prefix_state()
    path = save_ofa(tmp_path / "refcoco_prefix.pt", state, PREFIX_ARGS, with_args)
    config, weights, _ = read_fairseq_checkpoint(path)
    assert (config.encoder_prompt_length, config.decoder_prompt_length, config.adapter_dim) == (L_P, L_P, 0)
    prefix = expected_prefix_tables(state)
    tables = {k for k in state if "_prompt_encoder." in k}
    # every source key consumed: the base's stored keys as they are, OFA's two tables as the 4·LAYERS of ours
    assert set(weights) == (set(state) - tables - set(TIED_EMBEDDING_KEYS[1:])) | set(prefix)
    for key, value in weights.items():
        assert torch.equal(value, prefix[key] if key in prefix else state[key].float()), key


def test_the_cli_writes_a_model_dir_that_runs_with_the_prefix(tmp_path, capsys):
    state = ofa_prefix_state()
    path = save_ofa(tmp_path / "refcoco_prefix.pt", state, PREFIX_ARGS)
    out = tmp_path / "model"
    assert convert_main(["import-ofa", str(path), "--out", str(out)]) == 0
    assert f"encoder_prompt_length={L_P} decoder_prompt_length={L_P}" in capsys.readouterr().out
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["model"]["encoder_prompt_length"] == L_P and meta["model"]["decoder_prompt_length"] == L_P
    stored = load_file(str(out / WEIGHTS_FILE))
    for key, value in expected_prefix_tables(state).items():
        assert torch.equal(stored[key], value), key
    model = load_pretrained(out)
    inputs = dict(src_tokens=torch.tensor([[0, 5, 6, 2]]), patch_images=torch.zeros(1, 3, 32, 32),
                  patch_masks=torch.tensor([True]), prev_output_tokens=torch.tensor([[0, 7]]))
    with torch.no_grad():
        with_prefix = model(**inputs)
        for name, p in model.named_parameters():
            if ".prefix." in name:
                p.zero_()  # zero keys and values still join the softmax: the output must change
        without = model(**inputs)
    assert torch.isfinite(with_prefix).all() and not torch.allclose(with_prefix, without)


def test_an_adapter_checkpoint_imports_strictly(tmp_path):
    state = base_state(adapter_dim=R)  # OFA's adapter names are ours
    path = save_ofa(tmp_path / "refcoco_adapter.pt", state, ADAPTER_ARGS)
    config, weights, _ = read_fairseq_checkpoint(path)
    assert config.adapter_dim == R and config.encoder_prompt_length == 0
    assert {k for k in weights if ".adapter." in k} == {k for k in state if ".adapter." in k}
    assert len([k for k in weights if ".adapter." in k]) == 2 * LAYERS * 4
    for key, value in weights.items():
        assert torch.equal(value, state[key].float()), key


def test_a_prompt_table_the_args_do_not_announce_is_refused(tmp_path):
    """Strict: a checkpoint whose args say no prompt but which holds a prompt table is not silently trimmed."""
    path = save_ofa(tmp_path / "odd.pt", ofa_prefix_state(), {})
    with pytest.raises(UserError, match="2 unknown keys: decoder.decoder_prompt_encoder"):
        read_fairseq_checkpoint(path)


def test_the_reparameterisation_mlp_is_refused_in_one_sentence(tmp_path):
    state = ofa_prefix_state()
    state["encoder.encoder_prompt_encoder.trans.0.weight"] = torch.zeros(8, D)
    path = save_ofa(tmp_path / "proj.pt", state, {**PREFIX_ARGS, "encoder_prompt_projection": True})
    with pytest.raises(UserError, match="prompt-projection") as err:
        read_fairseq_checkpoint(path)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="reparameterisation MLP"):
        read_fairseq_checkpoint(save_ofa(tmp_path / "proj2.pt", state, {}, with_args=False))

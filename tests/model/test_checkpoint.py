"""Released-checkpoint import (fairseq format) and the ofa-scale model directory (safetensors + config.json).

The fake checkpoint follows the released files: every key of ofa_tiny_keys.tsv, fp16 floats, int64 BN counters,
garbage index buffers (to prove they are rebuilt, not loaded) including the stale 1025-entry
`decoder.image_position_idx`, and the shared embedding stored once under three keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ofa_scale.cli.convert_ckpt import main as convert_main
from ofa_scale.errors import UserError
from ofa_scale.model import OFAConfig, OFAModel, positions
from ofa_scale.model.checkpoint import (
    CONFIG_FILE,
    TIED_EMBEDDING_KEYS,
    WEIGHTS_FILE,
    canonical_state_dict,
    load_pretrained,
    read_fairseq_checkpoint,
    save_pretrained,
)
try:  # rootdir-style import (tests/model has no __init__.py) or package-relative if one is added
    from test_checkpoint_safe_load import save_with_omegaconf_cfg
except ImportError:  # pragma: no cover
    from .test_checkpoint_safe_load import save_with_omegaconf_cfg

KEYS_TSV = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "ofa_tiny_keys.tsv"
TINY_ARGS = dict(arch="ofa_tiny", encoder_embed_dim=256, decoder_embed_dim=256, encoder_ffn_embed_dim=1024,
                 decoder_ffn_embed_dim=1024, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_layers=4, decoder_layers=4, resnet_type="resnet50", code_image_size=128,
                 token_bucket_size=256, image_bucket_size=42, max_source_positions=1024,
                 max_target_positions=1024, scale_attn=True, scale_fc=True, scale_heads=True,
                 disable_entangle=True, share_all_embeddings=True, encoder_normalize_before=True,
                 dropout=0.1, attention_dropout=0.0, patch_image_size=480, freeze_encoder_embedding=True)


@pytest.fixture
def tmp_path(tmp_path):
    """pytest keeps the last runs' temp dirs; these checkpoints are ~70 MB each, so delete them after the test."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def key_shapes() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in KEYS_TSV.read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split("x")) if shape else ()))
    return rows


def fake_released_state(seed: int = 0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    shared = None
    buckets: dict[tuple[int, ...], torch.Tensor] = {}  # encoder and decoder share one garbage table per shape
    for key, shape in key_shapes():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(int(torch.randint(0, 10**6, (), generator=g)))
        elif key.endswith("_rp_bucket"):
            state[key] = buckets.setdefault(shape, torch.zeros(shape, dtype=torch.long))  # must be recomputed
        elif key == "decoder.image_position_idx":
            state[key] = torch.arange(1025)  # released files: 1025 entries (spec §5.1)
        elif key.endswith(".version"):
            state[key] = torch.tensor([3.0], dtype=torch.float16)
        elif key in TIED_EMBEDDING_KEYS:
            if shared is None:
                shared = (torch.randn(shape, generator=g) * 0.02).half()
            state[key] = shared
        elif key.endswith("running_var"):  # a variance: positive, or the BatchNorm output is NaN
            state[key] = (torch.rand(shape, generator=g) + 0.5).half()
        else:  # small, so a forward through 13 random ResNet blocks stays finite
            state[key] = (torch.randn(shape, generator=g) * 0.05).half()
    return state


@pytest.fixture(scope="module")
def released_state() -> OrderedDict:
    return fake_released_state()


def write_checkpoint(path: Path, state, style: str, **arg_changes) -> Path:
    margs = {**TINY_ARGS, **arg_changes}
    common = {"optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion",
                                     "optimizer_name": "FairseqAdam", "num_updates": 100}],
              "extra_state": {"epoch": 2, "train_iterator": {"epoch": 2, "iterations_in_epoch": 10}},
              "last_optimizer_state": None, "criterion": None, "task_state": {}, "model": state}
    if style == "args":
        torch.save({"args": argparse.Namespace(**margs), **common}, path)
    elif style == "cfg_namespace":  # what OFA's released checkpoints hold: plain cfg dict, legacy Namespace model
        torch.save({"args": None, "cfg": {"common": {"fp16": True}, "model": argparse.Namespace(**margs),
                                          "task": {"_name": "unify_task"}}, **common}, path)
    elif style == "cfg_omegaconf":
        save_with_omegaconf_cfg({"args": None, "cfg": {"common": {"fp16": True}, "model": margs,
                                                       "task": {"_name": "unify_task"}}, **common}, path)
    elif style == "no_config":
        torch.save({"model": state}, path)
    else:
        raise ValueError(style)
    return path


def expected_fp32(state, key: str) -> torch.Tensor:
    return state[key].float() if state[key].is_floating_point() else state[key]


@pytest.mark.parametrize("style", ["args", "cfg_namespace", "cfg_omegaconf", "no_config"])
def test_import_is_strict_exact_and_recomputes_buffers(tmp_path, released_state, style):
    path = write_checkpoint(tmp_path / "ofa_tiny.pt", released_state, style)
    config, weights, report = read_fairseq_checkpoint(path)
    preset = OFAConfig.preset("ofa_tiny")
    for f in ("d_model", "ffn_dim", "heads", "encoder_layers", "decoder_layers", "resnet", "vocab_size",
              "scale_attn", "scale_fc", "scale_heads", "image_bucket_size", "token_bucket_size"):
        assert getattr(config, f) == getattr(preset, f), f
    assert config.arch == "ofa_tiny"
    assert report.config_source == {"args": "args", "no_config": "shapes"}.get(style, "cfg.model")
    if style != "no_config":
        assert config.dropout == 0.1  # taken from the checkpoint's args
    # every stored tensor is the fp16 source widened to fp32, exactly
    for key, t in weights.items():
        assert torch.equal(t, expected_fp32(released_state, key)), key
        assert t.dtype == (torch.float32 if released_state[key].is_floating_point() else torch.int64)
    assert not any(k.endswith(("_rp_bucket", "image_position_idx", ".version")) for k in weights)
    assert not set(TIED_EMBEDDING_KEYS[1:]) & set(weights)

    model = load_pretrained(path)
    assert not model.training
    emb = model.encoder.embed_tokens.weight
    assert model.decoder.embed_tokens.weight is emb and model.decoder.output_projection.weight is emb
    assert torch.equal(emb, released_state["encoder.embed_tokens.weight"].float())
    assert model.decoder.image_position_idx.shape == (1026,)
    assert torch.equal(model.decoder.image_position_idx, positions.code_position_ids(16, 42))
    assert torch.equal(model.encoder.token_rp_bucket, positions.token_relative_buckets(256, 1024))
    assert torch.equal(model.decoder.image_rp_bucket, positions.image_relative_buckets(42))
    assert float(model.encoder.version) == 3.0


def _small_batch():
    g = torch.Generator().manual_seed(1)
    return dict(src_tokens=torch.tensor([[0, 11, 12, 13, 2], [0, 21, 22, 2, 1]]),
                patch_images=torch.randn(2, 3, 32, 32, generator=g), patch_masks=torch.tensor([True, False]),
                prev_output_tokens=torch.tensor([[0, 5, 6], [0, 7, 1]]))


def test_imported_model_matches_a_plainly_loaded_model(tmp_path, released_state):
    """The meta-device build path gives the same model as constructing normally and load_state_dict."""
    path = write_checkpoint(tmp_path / "ckpt.pt", released_state, "args", dropout=0.0)
    imported = load_pretrained(path)
    reference = OFAModel(OFAConfig.preset("ofa_tiny")).eval()
    sd = {k: v.float() if v.is_floating_point() else v for k, v in released_state.items()
          if not k.endswith(("_rp_bucket", "image_position_idx", ".version"))}
    reference.load_state_dict(sd, strict=False)
    with torch.no_grad():
        a, b = imported(**_small_batch()), reference(**_small_batch())
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_safetensors_directory_round_trips_bit_exactly(tmp_path, released_state):
    path = write_checkpoint(tmp_path / "ckpt.pt", released_state, "cfg_namespace")
    out = tmp_path / "model_dir"
    assert convert_main(["import-ofa", str(path), "--out", str(out)]) == 0
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and meta["model"]["arch"] == "ofa_tiny"
    stored = load_file(str(out / WEIGHTS_FILE))
    assert "decoder.output_projection.weight" not in stored and "encoder.token_rp_bucket" not in stored
    for key, t in stored.items():
        assert torch.equal(t, expected_fp32(released_state, key)), key

    model = load_pretrained(out)
    # perturb so the round trip is not trivially the import again, then save -> load -> compare everything
    with torch.no_grad():
        model.encoder.layers[0].fc1.weight.add_(0.123456789)
        model.encoder.embed_images.bn1.num_batches_tracked.fill_(77)
    out2 = save_pretrained(model, tmp_path / "again")
    back = load_pretrained(out2)
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert sd_a[key].dtype == sd_b[key].dtype and torch.equal(sd_a[key], sd_b[key]), key
    assert back.decoder.output_projection.weight is back.encoder.embed_tokens.weight
    assert canonical_state_dict(back).keys() == load_file(str(out2 / WEIGHTS_FILE)).keys()


def test_unknown_and_missing_keys_are_listed(tmp_path, released_state):
    state = OrderedDict(released_state)
    state["encoder.layers.0.extra_proj.weight"] = torch.zeros(2, 2, dtype=torch.float16)
    for i in range(4):
        del state[f"decoder.layers.{i}.ffn_layernorm.bias"]
    path = write_checkpoint(tmp_path / "bad.pt", state, "args")
    with pytest.raises(UserError) as err:
        read_fairseq_checkpoint(path)
    msg = str(err.value)
    assert "1 unknown keys: encoder.layers.0.extra_proj.weight" in msg
    assert "4 missing keys: decoder.layers.*.ffn_layernorm.bias ×4" in msg
    assert "\n" not in msg


def test_wrong_shape_and_untied_embedding_are_refused(tmp_path, released_state):
    state = OrderedDict(released_state)
    state["encoder.layers.1.fc1.weight"] = torch.zeros(8, 256, dtype=torch.float16)
    with pytest.raises(UserError, match=r"encoder.layers.1.fc1.weight \(8, 256\) vs model \(1024, 256\)"):
        read_fairseq_checkpoint(write_checkpoint(tmp_path / "a.pt", state, "args"))
    state = OrderedDict(released_state)
    state["decoder.output_projection.weight"] = state["decoder.output_projection.weight"] + 1
    with pytest.raises(UserError, match="shares one token embedding"):
        read_fairseq_checkpoint(write_checkpoint(tmp_path / "b.pt", state, "args"))


def test_unsupported_options_are_refused(tmp_path, released_state):
    path = write_checkpoint(tmp_path / "c.pt", released_state, "args", disable_entangle=False)
    with pytest.raises(UserError, match="disable_entangle=False"):
        read_fairseq_checkpoint(path)


def test_smaller_image_positions_and_vocab_get_appended_rows(tmp_path, released_state):
    state = OrderedDict(released_state)
    state["encoder.embed_image_positions.weight"] = released_state["encoder.embed_image_positions.weight"][:1000]
    short_vocab = released_state["encoder.embed_tokens.weight"][:59000]
    for key in TIED_EMBEDDING_KEYS:
        state[key] = short_vocab
    path = write_checkpoint(tmp_path / "small.pt", state, "args")
    config, weights, _ = read_fairseq_checkpoint(path)
    assert config.vocab_size == 59000  # default: keep the checkpoint's vocabulary
    model = load_pretrained(path, vocab_size=59457, seed=3)
    emb = model.encoder.embed_tokens.weight
    assert emb.shape == (59457, 256) and model.decoder.output_projection.weight is emb
    assert torch.equal(emb[:59000], short_vocab.float())
    d = 256
    new_rows = emb[59000:]
    assert abs(new_rows.std().item() - d**-0.5) < 0.1 * d**-0.5 and abs(new_rows.mean().item()) < 0.01
    pos = model.encoder.embed_image_positions.weight
    assert pos.shape == (1765, 256)
    assert torch.equal(pos[:1000], state["encoder.embed_image_positions.weight"].float())
    assert abs(pos[1000:].std().item() - d**-0.5) < 0.1 * d**-0.5
    # the decoder table was complete and is untouched
    assert torch.equal(model.decoder.embed_image_positions.weight,
                       released_state["decoder.embed_image_positions.weight"].float())
    # appended rows are reproducible from the seed
    again = load_pretrained(path, vocab_size=59457, seed=3)
    assert torch.equal(again.encoder.embed_tokens.weight, emb)


def test_larger_vocab_needs_explicit_truncation(tmp_path, released_state):
    path = write_checkpoint(tmp_path / "big.pt", released_state, "args")
    with pytest.raises(UserError, match="truncate"):
        read_fairseq_checkpoint(path, vocab_size=50000)
    config, weights, _ = read_fairseq_checkpoint(path, vocab_size=50000, truncate_vocab=True)
    assert weights["encoder.embed_tokens.weight"].shape == (50000, 256)
    assert torch.equal(weights["encoder.embed_tokens.weight"],
                       released_state["encoder.embed_tokens.weight"][:50000].float())


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = convert_main(["import-ofa", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ofa-convert: error:") and "does not exist" in err and "\n" not in err


def test_load_pretrained_rejects_newer_format(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / WEIGHTS_FILE).write_bytes(b"")
    (model_dir / CONFIG_FILE).write_text(json.dumps({"format_version": 99, "model": {}}))
    with pytest.raises(UserError, match="format_version 99"):
        load_pretrained(model_dir)


def test_config_overrides_apply_to_non_shape_fields(tmp_path, released_state):
    path = write_checkpoint(tmp_path / "ckpt.pt", released_state, "args")
    model = load_pretrained(path, config_overrides={"attention_impl": "math", "dropout": 0.0})
    assert model.config.attention_impl == "math" and model.config.dropout == 0.0
    assert dataclasses.asdict(model.config)["d_model"] == 256


def test_ema_weights_are_imported_on_request(tmp_path, released_state):
    ema = OrderedDict(released_state)
    ema["encoder.layer_norm.weight"] = torch.full((256,), 0.5, dtype=torch.float16)
    path = tmp_path / "ema.pt"
    torch.save({"args": argparse.Namespace(**TINY_ARGS), "model": released_state, "extra_state": {"ema": ema}},
               path)
    _, plain, _ = read_fairseq_checkpoint(path)
    _, averaged, report = read_fairseq_checkpoint(path, use_ema=True)
    assert report.used_ema
    assert torch.equal(plain["encoder.layer_norm.weight"], released_state["encoder.layer_norm.weight"].float())
    assert torch.equal(averaged["encoder.layer_norm.weight"], torch.full((256,), 0.5))
    with pytest.raises(UserError, match="no EMA weights"):
        read_fairseq_checkpoint(write_checkpoint(tmp_path / "plain.pt", released_state, "args"), use_ema=True)

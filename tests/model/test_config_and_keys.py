"""Presets reproduce OFA's parameter counts and state-dict names/shapes exactly (spec §4.1, §5.2)."""

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from ofa_scale.errors import ConfigError
from ofa_scale.model import OFAConfig, OFAModel

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"

SPEC_PARAMS = {
    "ofa_tiny": 33_488_336,
    "ofa_medium": 92_892_000,
    "ofa_base": 182_238_536,
    "ofa_large": 472_977_152,
    "ofa_huge": 929_486_848,
}


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_parameter_count_matches_spec(name):
    with torch.device("meta"):
        model = OFAModel(OFAConfig.preset(name))
    assert sum(p.numel() for p in model.parameters()) == SPEC_PARAMS[name]


def test_tiny_state_dict_equals_reference_keys_in_order():
    model = OFAModel(OFAConfig.preset("ofa_tiny"))
    ref = [line.rstrip("\n").split("\t") for line in (REFERENCE / "ofa_tiny_keys.tsv").read_text().splitlines()]
    mine = [(k, "x".join(map(str, v.shape))) for k, v in model.state_dict().items()]
    assert mine == [(k, shape) for k, shape in ref]


def test_base_state_dict_matches_collapsed_patterns():
    with torch.device("meta"):
        model = OFAModel(OFAConfig.preset("ofa_base"))
    ref = {}
    for line in (REFERENCE / "ofa_base_keys.tsv").read_text().splitlines():
        key, shape, dtype, count = line.split("\t")
        ref[key] = (shape, dtype, int(count[1:]))
    mine: dict[str, tuple] = {}
    counts: Counter = Counter()
    for key, value in model.state_dict().items():
        pattern = re.sub(r"^(encoder\.embed_images\.layer\d)\.\d+\.", r"\1.{j}.", key)
        pattern = re.sub(r"(layers|_list)\.\d+\.", r"\1.{i}.", pattern)
        # the reference lists the first occurrence's shape (block 0 of a stage has a different input width)
        mine.setdefault(pattern, (str(tuple(value.shape)), str(value.dtype).replace("torch.", "")))
        counts[pattern] += 1
    assert set(mine) == set(ref)
    for pattern, (shape, dtype, count) in ref.items():
        assert mine[pattern] == (shape, dtype), pattern
        assert counts[pattern] == count, pattern


def test_buffers_and_tied_embedding():
    model = OFAModel(OFAConfig.preset("ofa_tiny"))
    sd = model.state_dict()
    assert sd["encoder.version"].tolist() == [3.0] and sd["decoder.version"].tolist() == [3.0]
    assert sd["decoder.image_position_idx"].shape == (1026,)
    emb = model.encoder.embed_tokens.weight
    assert model.decoder.embed_tokens.weight is emb and model.decoder.output_projection.weight is emb
    assert torch.all(emb[1] == 0)  # padding row
    model.to(torch.bfloat16)  # the tie survives dtype/device moves
    assert model.decoder.output_projection.weight is model.encoder.embed_tokens.weight
    assert model.decoder.token_rp_bucket.dtype == torch.long
    # init_bert_params overrides the zero init of the relative tables (spec §9.14)
    table = model.encoder.token_rel_pos_table_list[0].weight
    assert 0.015 < table.std().item() < 0.025


def test_state_dict_round_trip_is_strict():
    torch.manual_seed(0)
    a = OFAModel(OFAConfig.preset("ofa_tiny", encoder_layers=1, decoder_layers=1))
    torch.manual_seed(1)
    b = OFAModel(OFAConfig.preset("ofa_tiny", encoder_layers=1, decoder_layers=1))
    b.load_state_dict(a.state_dict(), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert b.decoder.output_projection.weight is b.encoder.embed_tokens.weight


@pytest.mark.parametrize(
    "changes, word",
    [
        (dict(d_model=250), "divisible"),
        (dict(resnet="resnet18"), "resnet"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(dropout=1.5), "dropout"),
        (dict(code_image_size=1000), "code_image_size"),
    ],
)
def test_invalid_configs_raise_config_error(changes, word):
    with pytest.raises(ConfigError, match=word):
        OFAConfig.preset("ofa_tiny", **changes)


def test_unknown_preset_names_choices():
    with pytest.raises(ConfigError, match="ofa_tiny"):
        OFAConfig.preset("ofa_giant")


def test_config_loads_from_yaml_dict():
    from ofa_scale.utils.config import from_dict

    cfg = from_dict(OFAConfig, {"d_model": 128, "heads": 2, "attention_impl": "math"})
    assert cfg.head_dim == 64 and cfg.attention_impl == "math"

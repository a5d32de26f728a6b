"""`ofa-convert import-ofa` on an OFA-CN checkpoint (issue 13 §1, spec §10.1.3).

The checkpoint is synthesised with OFA-CN's layout: the three tied vocabulary tensors have 30,325 rows (BERT-CN's
21,128 pieces + 4 specials + <mask> + 8192 codes + 1000 bins), `cfg.task.bpe = "bert"`, fp16 tensors. The
transformer is shrunk (d 32, one layer each, ResNet-50) so the file stays small; only the row count is CN's.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ofa_scale.cli.convert_ckpt import main as convert_main
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.checkpoint import (CONFIG_FILE, EMBEDDING_KEY, TIED_EMBEDDING_KEYS, WEIGHTS_FILE, canonical_keys,
                                        load_pretrained, read_fairseq_checkpoint)

from tests.data.test_tokenizer_bert import SPEC_EXAMPLES, spec_sized_vocab, write_vocab
from tests.finetune.engine_data import BPE_DIR  # OFA's English GPT-2 BPE (59,457 ids)

CN_ROWS = 4 + 21128 + 1 + 8192 + 1000  # 30,325
D = 32
CN_ARGS = dict(arch="ofa_base", encoder_embed_dim=D, decoder_embed_dim=D, encoder_ffn_embed_dim=64,
               decoder_ffn_embed_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=1,
               decoder_layers=1, resnet_type="resnet50", token_bucket_size=256, image_bucket_size=42,
               max_source_positions=1024, max_target_positions=1024, scale_attn=True, scale_fc=True,
               scale_heads=True, disable_entangle=True, share_all_embeddings=True, encoder_normalize_before=True,
               decoder_normalize_before=True, dropout=0.1, attention_dropout=0.0)
# what OFA's caption scripts put in the task config for OFA-CN (spec §10.1.1)
CN_TASK = {"_name": "caption", "bpe": "bert", "bpe_dir": "../../utils/BERT_CN_dict", "code_dict_size": 8192,
           "num_bins": 1000}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ofa_cn")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def synthetic_state(config: OFAConfig) -> dict[str, torch.Tensor]:
    """Every stored key of `config`'s model as OFA saves it: fp16 (int64 BN counters), the embedding tied 3x."""
    with torch.device("meta"):
        keys = canonical_keys(OFAModel(config))
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, (shape, dtype) in keys.items():
        if not dtype.is_floating_point:
            state[key] = torch.randint(0, 1000, shape, generator=g, dtype=dtype)
        elif key.endswith("running_var"):
            state[key] = (torch.rand(shape, generator=g) + 0.5).half()
        else:
            state[key] = (torch.randn(shape, generator=g) * 0.05).half()
    for key in TIED_EMBEDDING_KEYS[1:]:
        state[key] = state[EMBEDDING_KEY]
    return state


@pytest.fixture(scope="module")
def cn_state():
    """The shrunk OFA-CN architecture's checkpoint tensors."""
    state = synthetic_state(OFAConfig.preset("ofa_base", d_model=D, ffn_dim=64, heads=2, encoder_layers=1,
                                             decoder_layers=1, resnet="resnet50", vocab_size=CN_ROWS))
    assert state[EMBEDDING_KEY].shape == (CN_ROWS, D)
    return state


@pytest.fixture(scope="module")
def cn_checkpoint(work, cn_state):
    path = work / "ofa_cn_base.pt"
    torch.save({"args": None, "model": cn_state, "extra_state": {"epoch": 1}, "last_optimizer_state": None,
                "cfg": {"common": {"fp16": True}, "model": argparse.Namespace(**CN_ARGS), "task": CN_TASK}}, path)
    return path


@pytest.fixture(scope="module")
def bert_dir(work):
    return write_vocab(work / "BERT_CN_dict", spec_sized_vocab())


def test_strict_import_keeps_every_tensor(cn_checkpoint, cn_state):
    config, weights, report = read_fairseq_checkpoint(cn_checkpoint)
    assert config.vocab_size == CN_ROWS and config.d_model == D and config.resnet == "resnet50"
    assert report.tokenizer_kind == "bert" and report.config_source == "cfg.model"
    # every stored tensor, and nothing else, is the fp16 source widened to fp32 exactly
    assert set(weights) == set(cn_state) - set(TIED_EMBEDDING_KEYS[1:])
    for key, t in weights.items():
        src = cn_state[key]
        assert torch.equal(t, src.float() if src.is_floating_point() else src), key
    model = load_pretrained(cn_checkpoint)
    emb = model.encoder.embed_tokens.weight
    assert emb.shape == (CN_ROWS, D)
    assert model.decoder.embed_tokens.weight is emb and model.decoder.output_projection.weight is emb


def test_cli_import_checks_the_bert_tokenizer_and_records_it(work, cn_checkpoint, cn_state, bert_dir, capsys):
    out = work / "model_dir"
    assert convert_main(["import-ofa", str(cn_checkpoint), "--out", str(out), "--tokenizer-path", bert_dir]) == 0
    assert "vocab=30325" in capsys.readouterr().out
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["model"]["vocab_size"] == CN_ROWS and meta["extra"]["tokenizer_kind"] == "bert"
    stored = load_file(str(out / WEIGHTS_FILE))
    assert torch.equal(stored[EMBEDDING_KEY], cn_state[EMBEDDING_KEY].float())

    # the imported model runs OFA-CN's caption prompt: one logit per id of the BERT layout
    from ofa_scale.data.tokenizer import load_tokenizer

    tok = load_tokenizer("bert", bert_dir)
    model = load_pretrained(out)
    src = torch.tensor([[tok.bos, *SPEC_EXAMPLES[0][1], tok.eos]])
    with torch.no_grad():
        logits = model(src_tokens=src, patch_images=torch.zeros(1, 3, 32, 32), patch_masks=torch.tensor([True]),
                       prev_output_tokens=torch.tensor([[tok.bos, tok.bin_token(5)]]))
    assert logits.shape == (1, 2, len(tok)) and torch.isfinite(logits).all()


def test_cli_refuses_the_wrong_tokenizer_in_one_line(work, cn_checkpoint, capsys):
    out = work / "refused"
    rc = convert_main(["import-ofa", str(cn_checkpoint), "--out", str(out), "--tokenizer-kind", "gpt2-bpe",
                       "--tokenizer-path", str(BPE_DIR)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "30325 token embeddings" in err and "59457 ids" in err and "bert" in err
    assert not (out / CONFIG_FILE).exists()

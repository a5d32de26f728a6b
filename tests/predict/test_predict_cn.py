"""`ofa-predict` on a bare OFA-CN model dir (issue 13 §1): the dir `ofa-convert import-ofa --tokenizer-kind bert`
writes records the tokenizer kind, so the model loads with BERT's WordPiece and its tasks take OFA-CN's Chinese
recipes and prompts (spec §10.1.4) without a run dir; tasks OFA-CN has no prompt for are refused in one sentence.
The prompt ids are spec §10.1.2's verified encodings (tests/data/test_tokenizer_bert.py)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from ofa_scale.cli.convert_ckpt import main as convert_main
from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import UserError
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.checkpoint import canonical_state_dict
from ofa_scale.predict.cli import main as predict_main
from ofa_scale.predict.tasks import SPECS, Predictor, task_section
from tests.data.test_tokenizer_bert import SPEC_EXAMPLES, spec_sized_vocab, write_vocab
from tests.model.test_import_ofa_cn import CN_ARGS, CN_ROWS, CN_TASK, D

BOS, EOS = 0, 2
CAPTION_IDS = SPEC_EXAMPLES[0][1]
SMALL = ["--set", "image_size=64", "--set", "decoding.beam=2", "--set", "decoding.max_len_b=3", "--batch-size", "2"]


@pytest.fixture(scope="module")
def cn(tmp_path_factory):
    """An OFA-CN .pt (the shrunk architecture of the import test, random weights) imported into a model dir."""
    root = tmp_path_factory.mktemp("predict_cn")
    bert_dir = write_vocab(root / "BERT_CN_dict", spec_sized_vocab())
    torch.manual_seed(0)
    model = OFAModel(OFAConfig.preset("ofa_base", d_model=D, ffn_dim=64, heads=2, encoder_layers=1, decoder_layers=1,
                                      resnet="resnet50", vocab_size=CN_ROWS))
    ckpt = root / "ofa_cn.pt"
    torch.save({"model": canonical_state_dict(model), "cfg": {"model": argparse.Namespace(**CN_ARGS),
                                                              "task": CN_TASK}}, ckpt)
    model_dir = root / "model"
    assert convert_main(["import-ofa", str(ckpt), "--out", str(model_dir), "--tokenizer-kind", "bert",
                         "--tokenizer-path", bert_dir]) == 0
    images = root / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (60 + 10 * i, 50), (30 * i, 120, 200)).save(images / f"img{i}.png")
    return {"model": model_dir, "bert": bert_dir, "images": images, "tok": load_tokenizer("bert", bert_dir)}


def test_a_bert_model_takes_the_chinese_recipes_and_prompts(cn):
    tok = cn["tok"]
    section = task_section(SPECS["caption"], run_task=None, recipe=None, answers=None, overrides=[], batch_size=1,
                           tokenizer=tok)
    assert section.language == "zh" and section.decoding.beam == 8  # muge_caption_base (generate_caption_cn.sh)
    item = Predictor(SPECS["caption"], section, tok).item("a", Image.new("RGB", (40, 30)), "", {})
    assert list(item.source) == [BOS, *CAPTION_IDS, EOS]  # 图片描述了什么内容?
    grounding = task_section(SPECS["grounding"], run_task=None, recipe=None, answers=None, overrides=[],
                             batch_size=1, tokenizer=tok)
    assert grounding.language == "zh"
    for name in ("vqa", "snli_ve"):
        with pytest.raises(UserError, match="no Chinese prompt in OFA-CN") as err:
            task_section(SPECS[name], run_task=None, recipe=None, answers=None, overrides=[], batch_size=1,
                         tokenizer=tok)
        assert "\n" not in str(err.value)


def test_ofa_predict_on_the_bare_model_dir(cn, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    # no --tokenizer-kind anywhere: the model dir says bert
    assert predict_main(["--model", str(cn["model"]), "--tokenizer-path", cn["bert"], "--task", "caption",
                         "--input", str(cn["images"]), "--out", str(out), *SMALL]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["img0.png", "img1.png"] and all(isinstance(g["caption"], str) for g in got)
    rc = predict_main(["--model", str(cn["model"]), "--tokenizer-path", cn["bert"], "--task", "vqa", "--input",
                       str(cn["images"]), "--text", "这是什么?", "--out", str(tmp_path / "vqa.jsonl"), *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "no Chinese prompt in OFA-CN" in err and "Traceback" not in err

"""`ofa-eval generate --tokenizer-kind` defaults to the kind a model dir recorded (issue 11 review): an OFA-CN
import (`ofa-convert import-ofa --tokenizer-kind bert`) evaluates with BERT's WordPiece without naming it, where the
old gpt2-bpe default failed to find BPE files in the BERT directory."""

from __future__ import annotations

import json

import pytest

from ofa_scale.cli.evaluate import main
from ofa_scale.cli.preprocess import main as preprocess
from tests.predict.test_predict_cn import cn  # noqa: F401  (the OFA-CN model dir fixture)

IMAGE = ["--image-size", "64", "--grounding-image-size", "64"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_cn")
    assert preprocess(["sample", "--out", str(root / "tsv"), "--rows", "8", "--seed", "3", "--finetune-images", "0",
                       "--text-rows", "0", "--image-gen-rows", "0"]) == 0
    assert preprocess(["shards", "--vl", str(root / "tsv" / "vision_language_examples.tsv"), "--out",
                       str(root / "shards"), "--no-progress"]) == 0
    return root / "shards"


def test_generate_uses_the_model_dirs_recorded_tokenizer(cn, shards, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    rc = main(["generate", "--checkpoint", str(cn["model"]), "--tokenizer-path", cn["bert"], "--data", str(shards),
               "--tasks", "caption", "--limit", "2", "--beam", "1", "--out", str(out), *IMAGE])
    err = capsys.readouterr().err
    assert rc == 0, err
    summary = json.loads((out / "eval.json").read_text())
    assert summary["tasks"]["caption"]["counts"]["samples"] == 2
    # naming the other kind still wins over the record: gpt2-bpe finds no BPE files in the BERT directory
    rc = main(["generate", "--checkpoint", str(cn["model"]), "--tokenizer-path", cn["bert"], "--data", str(shards),
               "--tasks", "caption", "--limit", "2", "--out", str(tmp_path / "bpe"), "--tokenizer-kind", "gpt2-bpe",
               *IMAGE])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err

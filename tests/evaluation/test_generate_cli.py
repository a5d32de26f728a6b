"""`ofa-eval generate` on a tiny random model and a small synthetic corpus: inputs, decoding constraints, the
token → box conversion, output files, re-scoring, and loading an ofa-train run directory."""

import json

import pytest
import torch
import yaml

from ofa_scale.cli.evaluate import main
from ofa_scale.cli.preprocess import main as preprocess
from ofa_scale.evaluation.metrics.grounding import bins_to_box
from ofa_scale.evaluation.model_source import DEEPSPEED_MODEL_STATES, load_eval_model
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.checkpoint import save_pretrained

TINY = dict(d_model=64, ffn_dim=128, heads=4, encoder_layers=1, decoder_layers=1)
IMAGE = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    assert preprocess(["sample", "--out", str(root / "tsv"), "--rows", "40", "--seed", "5"]) == 0
    assert preprocess(["shards", "--vl", str(root / "tsv" / "vision_language_examples.tsv"), "--out",
                       str(root / "shards"), "--no-progress"]) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def tiny_model(bpe_dir):
    from ofa_scale.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    return OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=len(load_tokenizer("gpt2-bpe", bpe_dir)), **TINY)).eval()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def answers_file(tmp_path):
    """VQA candidates none of the sample corpus' questions has as a reference (its answers are numbers, yes/no,
    colours and shapes)."""
    path = tmp_path / "answers.txt"
    path.write_text("zebra\nhot dog\nsurfing\n")
    return path


def test_generate_scores_every_task_and_outputs_rescore(tmp_path, shards, tiny_model, bpe_dir, answers_file,
                                                        capsys):
    model_dir = save_pretrained(tiny_model, tmp_path / "model")
    out = tmp_path / "eval"
    rc = main(["generate", "--checkpoint", str(model_dir), "--tokenizer-path", str(bpe_dir), "--data", str(shards),
               "--limit", "4", "--image-size", str(IMAGE), "--grounding-image-size", str(IMAGE), "--out", str(out),
               "--answers", str(answers_file)])
    assert rc == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["kind"] == "ofa-scale evaluation summary" and set(summary["tasks"]) == {"caption", "vqa",
                                                                                            "grounding"}
    printed = capsys.readouterr().out
    for task, info in summary["tasks"].items():
        assert info["counts"]["samples"] > 0 and task in printed
        preds, refs = read_jsonl(out / task / "predictions.jsonl"), read_jsonl(out / task / "references.jsonl")
        assert [p["id"] for p in preds] == [r["id"] for r in refs]
        # the written files are a complete, re-scorable record of the evaluation
        assert main(["score", "--task", task, "--predictions", str(out / task / "predictions.jsonl"),
                     "--references", str(out / task / "references.jsonl"), "--out", str(tmp_path / task)]) == 0
        rescored = json.loads((tmp_path / task / "eval.json").read_text())["metrics"]
        assert rescored == pytest.approx(info["metrics"])
    assert summary["tasks"]["caption"]["counts"]["samples"] == 4

    # VQA decoding is trie-constrained to the candidate file alone: the questions' own reference answers (which
    # would leak the labels) are never candidates, so with a file that holds none of them no answer is right.
    vqa_refs = read_jsonl(out / "vqa" / "references.jsonl")
    assert not {a["answer"].strip() for r in vqa_refs for a in r["answers"]} & {"zebra", "hot dog", "surfing"}
    assert {p["answer"] for p in read_jsonl(out / "vqa" / "predictions.jsonl")} <= {"zebra", "hot dog", "surfing"}
    assert summary["tasks"]["vqa"]["metrics"]["vqa_score"] == 0

    # Grounding emits exactly 4 bins, converted with bin/999·512 on the 64-px input, then × W/64, × H/64.
    for pred, ref in zip(read_jsonl(out / "grounding" / "predictions.jsonl"),
                         read_jsonl(out / "grounding" / "references.jsonl")):
        assert len(pred["bins"]) == 4 and all(0 <= b <= 999 for b in pred["bins"])
        expected = [b / 999 * 512 for b in pred["bins"]]
        expected = [expected[0] * ref["width"] / IMAGE, expected[1] * ref["height"] / IMAGE,
                    expected[2] * ref["width"] / IMAGE, expected[3] * ref["height"] / IMAGE]
        assert pred["box"] == pytest.approx(expected)
        assert pred["box"] == pytest.approx(bins_to_box(pred["bins"], ref["width"], ref["height"],
                                                        input_size=IMAGE))


def _fake_run_dir(root, shards, bpe_dir, model, step=2):
    """The files ofa-train leaves behind (run_dir.py / training/checkpoint.py, DeepSpeed ZeRO-1 layout)."""
    config = {"model": {"arch": "ofa_tiny", "overrides": dict(TINY)},
              "data": {"root": str(shards), "tokenizer": {"kind": "gpt2-bpe", "path": str(bpe_dir)}},
              "objectives": {"vl": {"image_size": IMAGE}},
              "train": {"steps": step, "global_batch_size": 2, "micro_batch_size": 2},
              "parallel": {"zero_stage": 1, "micro_batches": 1}, "format_version": 1}
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    tag = f"step_{step:06d}"
    tag_dir = root / "checkpoints" / tag
    tag_dir.mkdir(parents=True)
    module = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}  # GroupsForward wraps the model
    torch.save({"module": module, "ds_version": "0.19.8", "optimizer": None}, tag_dir / DEEPSPEED_MODEL_STATES)
    (tag_dir / "trainer.json").write_text(json.dumps({"format_version": 1, "tag": tag, "step": step}))
    (root / "checkpoints" / "latest").write_text(tag)
    return root


def test_run_directory_loads_weights_and_training_geometry(tmp_path, shards, tiny_model, bpe_dir):
    run = _fake_run_dir(tmp_path / "run", shards, bpe_dir, tiny_model)
    loaded = load_eval_model(run)
    reference = tiny_model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    geometry = loaded.geometry
    assert (geometry.image_size, geometry.grounding_image_size) == (IMAGE, IMAGE)
    assert geometry.box_normaliser == pytest.approx(512 * IMAGE / 384)  # the run's scaled box normaliser
    assert loaded.description["tag"] == "step_000002"
    # a step directory selects that checkpoint
    assert load_eval_model(run / "checkpoints" / "step_000002").description["tag"] == "step_000002"

    out = tmp_path / "eval"
    assert main(["generate", "--checkpoint", str(run), "--data", str(shards), "--tasks", "grounding", "--limit", "2",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "grounding" / "eval.json").read_text())
    assert doc["input_geometry"]["box_normaliser"] == pytest.approx(512 * IMAGE / 384)
    assert doc["counts"]["samples"] == 2


def test_generate_user_errors(tmp_path, shards, answers_file, capsys):
    # VQA without a candidate file is refused before the checkpoint is even read
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--data", str(shards), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--answers" in err and "ofa-preprocess vqa-answers" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--data", str(shards), "--out",
                 str(tmp_path / "o"), "--answers", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    # without vqa no candidate file is needed
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--data", str(shards), "--out",
                 str(tmp_path / "o"), "--tasks", "caption"]) == 2
    assert "does not exist" in capsys.readouterr().err
    answers = ["--answers", str(answers_file)]
    (tmp_path / "m").mkdir()
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--data", str(shards), "--out",
                 str(tmp_path / "o"), *answers]) == 2
    assert "is neither an ofa-scale model directory (no config.json) nor an ofa-train run directory" \
        in capsys.readouterr().err
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--data", str(shards), "--out",
                 str(tmp_path / "o"), *answers]) == 2
    assert "--tokenizer-path" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--data", str(shards), "--tasks", "caption,ocr",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    assert "manifest.json" in capsys.readouterr().err

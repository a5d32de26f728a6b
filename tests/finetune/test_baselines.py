"""The trivial baselines (ofa_scale/finetune/baselines.py): the constant each learns from real training shards, and
its score on real evaluation shards, hand-checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.finetune.baselines import baseline_metrics, constant_value, main
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.task import make_task

sys.path.insert(0, str(Path(__file__).parent))
from tsv_shards import image_b64, shard_records  # noqa: E402


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


def shards(tmp: Path, split: str, fmt: str, rows: list[list[str]]) -> Path:
    folder = tmp / split
    folder.mkdir()
    shard_records(folder, fmt, rows)
    return folder / f"{fmt}_shards"


def test_majority_label_and_its_accuracy(tok, tmp_path):
    img = image_b64(40, 32)
    train = shards(tmp_path, "train", "snli_ve", [
        ["s1", "1", img, "a dog", "a dog", "entailment"], ["s2", "1", img, "a cat", "a dog", "contradiction"],
        ["s3", "2", img, "two cats", "a dog", "contradiction"]])
    test = shards(tmp_path, "test", "snli_ve", [
        ["t1", "3", img, "a cat", "a dog", "contradiction"], ["t2", "3", img, "it is old", "a dog", "neutral"]])
    task = make_task(TaskSection(name="snli_ve", prompt_type="prev_output", add_caption=True, image_size=32), tok)
    value, metrics = baseline_metrics(task, train, test)
    assert value == "no"  # contradiction, as the loader's label word
    assert metrics == {"accuracy": 0.5}


def test_majority_answer_is_the_most_frequent_training_target(tok, tmp_path):
    img = image_b64(40, 32)
    # targets: "2" (its highest confidence), "2", "yes"; "yes" appears more often overall but only once on top
    train = shards(tmp_path, "train", "vqa", [
        ["10", "1", "how many?", "0.3|!+yes&&1.0|!+2", "", img], ["11", "1", "how many?", "1.0|!+2", "", img],
        ["12", "2", "is it?", "1.0|!+yes&&0.3|!+yes", "", img]])
    test = shards(tmp_path, "test", "vqa", [
        ["20", "3", "how many?", "0.6|!+2&&1.0|!+3", "", img], ["21", "3", "is it?", "1.0|!+no", "", img]])
    task = make_task(TaskSection(name="vqa", prompt_type="prev_output", image_size=32, constrained_training=False,
                                 decoding=DecodingSection(inference="beam")), tok)
    value, metrics = baseline_metrics(task, train, test)
    assert value == "2"
    assert metrics["vqa_score"] == pytest.approx((0.6 + 0.0) / 2)


def test_whole_image_box_hits_only_boxes_covering_half_the_image(tok, tmp_path):
    img = image_b64(40, 32)
    train = shards(tmp_path, "train", "refcoco", [["1", "1", "the dog", "0,0,10,10", img]])
    # IoU with the whole 40x32 image: 36x30/1280 = 0.84 (a hit), 10x10/1280 (a miss)
    test = shards(tmp_path, "test", "refcoco", [["2", "2", "the big dog", "2,1,38,31", img],
                                                ["3", "2", "the cat", "0,0,10,10", img]])
    task = make_task(TaskSection(name="refcoco", image_size=32, box_normaliser=32.0), tok)
    value, metrics = baseline_metrics(task, train, test)
    assert value is None and metrics == {"acc@0.5": 0.5}


def test_constant_caption_is_the_most_frequent_training_caption(tok, tmp_path):
    img = image_b64(40, 32)
    # "a red square" twice (once inside an && row), "two dogs" twice but met later: ties go to the first met
    train = shards(tmp_path, "train", "caption", [
        ["1", "1", "two dogs", "", img], ["2", "2", "a red square&&two dogs", "", img],
        ["3", "3", "a red square", "", img], ["4", "4", "a cat", "", img]])
    task = make_task(TaskSection(name="caption", image_size=32), tok)
    assert constant_value(task, train) == "two dogs"


def test_cli_prints_the_baseline_and_refuses_a_non_finetuning_config(tmp_path, capsys, bpe_dir):
    img = image_b64(40, 32)
    train = shards(tmp_path, "train", "snli_ve", [["s1", "1", img, "a dog", "a dog", "entailment"]])
    recipe = Path(__file__).parents[2] / "configs" / "finetune" / "snli_ve_base.yaml"
    out = tmp_path / "baseline.json"
    assert main(["--config", str(recipe), "--train", str(train), "--data", str(train), "--out", str(out),
                 "--set", f"data.tokenizer.path={bpe_dir}", "--set", "task.image_size=32"]) == 0
    assert "baseline snli_ve: the majority training label ('yes'): accuracy 1.0000" in capsys.readouterr().out
    assert '"value": "yes"' in out.read_text()
    pretraining = recipe.parents[1] / "demo.yaml"
    assert main(["--config", str(pretraining), "--data", str(train)]) == 2
    assert "sets no task.name" in capsys.readouterr().err


def test_majority_class_and_its_accuracy(tok, tmp_path):
    img = image_b64(40, 32)
    # "red  circle" (spaces as a TSV may have them) twice, "blue square" twice but met later: the first met wins
    train = shards(tmp_path, "train", "imagenet", [
        [img, "1", "red  circle"], [img, "2", "blue square"], [img, "2", "blue square"], [img, "1", "red circle"]])
    test = shards(tmp_path, "test", "imagenet", [[img, "1", "red circle"], [img, "2", "blue square"],
                                                 [img, "1", "red circle"]])
    names = tmp_path / "synset_words.txt"
    names.write_text("n90000001 red circle\nn90000002 blue square\n")
    task = make_task(TaskSection(name="imagenet", prompt_type="none", image_size=32, class_names=str(names)), tok)
    value, metrics = baseline_metrics(task, train, test)
    assert value == "red circle"
    assert metrics == {"accuracy": pytest.approx(2 / 3)}

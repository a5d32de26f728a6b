"""The evaluation driver (finetune/evaluate.py) in one process: records read once in order and split over
data-parallel ranks without loss or overlap, padding items for ranks with fewer, predictions in record order,
the results/metrics/markdown files. (Several ranks: tests/finetune/test_trainer_parallel.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from ofa_scale.errors import UserError
from tests.finetune.engine_data import BPE_DIR, caption_shards
from tests.finetune.engine_fake_task import FakeCaptionTask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ofa_scale.data.tokenizer import load_tokenizer
    from ofa_scale.finetune.config import DecodingSection, TaskSection
    from ofa_scale.model import OFAModel
    from ofa_scale.model.config import OFAConfig

    root = tmp_path_factory.mktemp("ft_eval")
    tok = load_tokenizer("gpt2-bpe", str(BPE_DIR))
    task = FakeCaptionTask(TaskSection(name="caption", image_size=32,
                                       decoding=DecodingSection(beam=2, max_len_b=2, batch_size=2)), tok)
    torch.manual_seed(0)
    model = OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=len(tok), d_model=32, ffn_dim=64, heads=2,
                                      encoder_layers=1, decoder_layers=1)).eval()
    return {"task": task, "model": model, "valid": caption_shards(root, "valid", 7, skip=(3,)), "root": root}


def test_records_split_over_ranks_cover_every_item_once(setup):
    from ofa_scale.finetune.evaluate import read_items

    task, valid = setup["task"], setup["valid"]
    whole, spare = read_items(task, valid)
    assert [i for i, _ in whole] == [0, 1, 2, 4, 5, 6]  # record 3 has no item
    assert spare is whole[0][1]
    shares = [read_items(task, valid, dp_rank=r, dp_size=3) for r in range(3)]
    assert sorted(i for mine, _ in shares for i, _ in mine) == [0, 1, 2, 4, 5, 6]
    assert [[i for i, _ in mine] for mine, _ in shares] == [[0, 6], [1, 4], [2, 5]]
    # a rank whose records all lack items still gets a spare to run the others' batches with
    lonely, spare = read_items(task, valid, limit=4, dp_rank=3, dp_size=4)
    assert lonely == [] and spare is not None and spare.id == 100
    assert [i for i, _ in read_items(task, valid, limit=3)[0]] == [0, 1, 2]


def test_evaluate_predicts_in_record_order_and_writes_the_files(setup, tmp_path):
    from ofa_scale.finetune.evaluate import evaluate, markdown_header, write_outputs

    task, model, valid = setup["task"], setup["model"], setup["valid"]
    result = evaluate(task, model, valid, device=torch.device("cpu"), final=True)
    assert result.samples == 6 and [p["id"] for p in result.predictions] == [100, 101, 102, 104, 105, 106]
    assert all(it.image.numel() == 0 for it in result.items)  # gathered without their pixels
    assert result.metrics["final"] == 1.0 and result.metrics["length"] == pytest.approx((4 * 3 + 2 * 6) / 6)
    # the same predictions when the caller keeps the items (the trainer reads the valid set once)
    from ofa_scale.finetune.evaluate import read_items

    again = evaluate(task, model, valid, device=torch.device("cpu"), items=read_items(task, valid))
    assert again.predictions == result.predictions
    assert not model.training  # left as it was
    paths = write_outputs(tmp_path / "out", task, result, label="fake")
    results = json.loads(paths["results"].read_text())
    assert [r["image_id"] for r in results] == [100, 101, 102, 104, 105, 106]
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["task"] == "caption" and metrics["samples"] == 6 and metrics["match"] == result.metrics["match"]
    row = paths["row"].read_text().strip()
    assert row.startswith("| fake | ") and row.count("|") == len(task.metrics) + 2
    assert markdown_header(task).splitlines()[0] == "| recipe | match | length | first |"


def test_caption_results_list_each_image_once(setup):
    from ofa_scale.finetune.evaluate import results_entries

    preds = [{"id": 7, "caption": "a"}, {"id": 7, "caption": "b"}, {"id": 8, "caption": "c"}]
    assert results_entries(setup["task"], preds) == [{"image_id": 7, "caption": "a"}, {"image_id": 8, "caption": "c"}]


def test_an_evaluation_set_without_items_is_refused(setup):
    from ofa_scale.finetune.evaluate import evaluate

    empty = caption_shards(setup["root"], "only_skips", 2, skip=(0, 1))
    with pytest.raises(UserError, match="gives no evaluation items"):
        evaluate(setup["task"], setup["model"], empty, device=torch.device("cpu"))
    with pytest.raises(UserError, match="holds no manifest.json"):
        evaluate(setup["task"], setup["model"], setup["root"], device=torch.device("cpu"))


def test_ofa_eval_run_on_a_model_directory(setup, tmp_path, monkeypatch, capsys):
    """`ofa-eval run` with an ofa-scale model directory (the recipe names the tokenizer), and its refusals."""
    import yaml

    from ofa_scale.cli.evaluate import main
    from ofa_scale.finetune import task as task_module
    from ofa_scale.model.checkpoint import save_pretrained
    from tests.finetune.engine_data import finetune_config
    from tests.finetune.engine_fake_task import install

    monkeypatch.setattr(task_module, "_REGISTRY", dict(task_module._REGISTRY))
    install()
    model_dir = tmp_path / "model"
    save_pretrained(setup["model"], model_dir)
    cfg = finetune_config(setup["valid"], setup["valid"], task={"decoding": {"beam": 2, "max_len_b": 2,
                                                                             "batch_size": 2}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    args = ["run", "--config", str(recipe), "--checkpoint", str(model_dir), "--data", str(setup["valid"])]
    assert main([*args, "--out", str(tmp_path / "out"), "--label", "tiny"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["samples"] == 6 and metrics["final"] == 1.0 and metrics["checkpoint"]["kind"] == "model"
    assert "| tiny |" in capsys.readouterr().out
    # one-line refusals: a non-empty --out, a missing checkpoint, a pretraining config
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["run", "--config", str(recipe), "--checkpoint", str(tmp_path / "nope"), "--data",
                 str(setup["valid"]), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    pre = {k: v for k, v in cfg.items() if k != "task"}
    pre["data"] = {**cfg["data"], "train": "", "valid": "", "root": str(setup["valid"])}
    pre["train"] = {**cfg["train"], "epochs": 0, "steps": 5}
    recipe.write_text(yaml.safe_dump(pre))
    assert main([*args, "--out", str(tmp_path / "o3")]) == 2
    assert "sets no task.name" in capsys.readouterr().err

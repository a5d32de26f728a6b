"""Config loading and validation: every user mistake ends in one line naming the fix, before any process group."""

from __future__ import annotations

import pytest
import yaml

from ofa_scale.errors import ConfigError
from ofa_scale.train import main
from ofa_scale.training.config import check_world, load_training_config

BASE = {
    "model": {"arch": "ofa_tiny"},
    "data": {"root": "/data/shards", "tokenizer": {"kind": "gpt2-bpe", "path": "/data/bpe"}},
    "train": {"steps": 100, "global_batch_size": 32, "micro_batch_size": 8},
    "parallel": {"zero_stage": 3},
}


@pytest.fixture
def config_file(tmp_path):
    def write(data=None):
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(BASE if data is None else data))
        return path

    return write


def test_valid_config_loads_with_ofa_defaults(config_file):
    cfg = load_training_config(config_file())
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.clip_norm) == ([0.9, 0.999], 1e-8,
                                                                                           0.01, 5.0)
    assert cfg.schedule.warmup_ratio == 0.01 and cfg.schedule.end_lr == 0.0
    assert cfg.precision == "fp32" and cfg.parallel.zero_stage == 3 and cfg.train.seed == 7
    assert check_world(cfg, 1) == 4 and check_world(cfg, 4) == 1


def test_overrides_are_typed_and_applied(config_file):
    cfg = load_training_config(config_file(), ["optim.lr=3e-5", "precision=bf16", "train.steps=7",
                                               "model.overrides.encoder_layers=2"])
    assert cfg.optim.lr == 3e-5 and cfg.precision == "bf16" and cfg.train.steps == 7
    assert cfg.model.overrides == {"encoder_layers": 2}


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["zero_stage=2"], "unknown config key 'zero_stage' (did you mean 'parallel.zero_stage'?)"),
    (["train.steps=many"], "train.steps: expected an integer, got 'many'"),
    (["precision=fp8"], "precision: 'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
    (["parallel.zero_stage=4"], "parallel.zero_stage is 4; use 0, 1, 2 or 3"),
    (["data.root="], "data.root is missing"),
    (["model.arch="], "model.arch is missing"),
    (["train.global_batch_size=30"], "train.global_batch_size=30 is not a multiple of train.micro_batch_size=8"),
    (["train.steps=0"], "train.steps is 0; set it to a positive integer"),
    (["optim.betas=[0.9]"], "optim.betas is [0.9]"),
    (["schedule.warmup_steps=100"], "schedule.warmup_steps=100 must be in [0, train.steps=100)"),
    (["parallel.micro_batches=4"], "parallel.micro_batches is derived"),
    (["deepspeed.offload=true", "parallel.zero_stage=2"], "deepspeed.offload needs parallel.zero_stage=3"),
    (["objectives.tasks=[captioning]"], "objectives.tasks has unknown task(s) ['captioning']"),
    (["objectives.drop_worst_ratio=0.1"], "objectives.drop_worst_ratio is a caption-finetuning option"),
])
def test_invalid_values_name_the_fix(config_file, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_training_config(config_file(), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_global_batch_must_split_over_data_parallel_ranks(config_file):
    cfg = load_training_config(config_file())
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size=8 x data-parallel size 3; "
                                          "make the global batch a multiple of 24"):
        check_world(cfg, 3)
    cfg = load_training_config(config_file(), ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tp"):
        check_world(cfg, 3)
    assert check_world(cfg, 4) == 2  # dp = 2


def test_cli_prints_one_line_and_exits_2(config_file, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc = main(["--config", str(config_file()), "--run-dir", "unused", "--validate-only"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("ofa-train: error: train.global_batch_size=32 is not divisible")
    rc = main(["--config", "/nonexistent.yaml", "--run-dir", "unused"])
    assert rc == 2 and "config file /nonexistent.yaml does not exist" in capsys.readouterr().err


def test_missing_shards_fail_before_any_process_group(config_file, tmp_path, capsys, bpe_dir):
    data = dict(BASE, data={"root": str(tmp_path / "nowhere"), "tokenizer": {"kind": "gpt2-bpe", "path": str(bpe_dir)}})
    rc = main(["--config", str(config_file(data)), "--run-dir", str(tmp_path / "run")])
    assert rc == 2
    assert "holds no manifest.json; point it at the output of `ofa-preprocess shards`" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fp16_on_a_cpu_only_machine_is_refused_before_start(config_file, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU host
    rc = main(["--config", str(config_file()), "--run-dir", "unused", "--validate-only", "--set", "precision=fp16"])
    assert rc == 2 and "precision=fp16 needs a GPU" in capsys.readouterr().err


def test_a_runs_saved_config_is_a_valid_config(config_file, tmp_path):
    from ofa_scale.training.run_dir import open_run_dir

    cfg = load_training_config(config_file())
    run, _ = open_run_dir(tmp_path / "run", resume=False)
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg.to_dict())
    again = load_training_config(run.config)
    assert again.to_dict() == cfg.to_dict()

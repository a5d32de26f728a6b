"""The DeepSpeed config is the template plus what the YAML decides; the two can never disagree silently."""

from __future__ import annotations

import json

import pytest
import yaml

from ofa_scale.errors import ConfigError
from ofa_scale.training.config import check_world, load_training_config
from ofa_scale.training.ds_config import TEMPLATE_DIR, build_ds_config, default_template

BASE = {
    "model": {"arch": "ofa_tiny"},
    "data": {"root": "/data/shards", "tokenizer": {"kind": "gpt2-bpe", "path": "/data/bpe"}},
    "train": {"steps": 100, "global_batch_size": 64, "micro_batch_size": 8},
    "optim": {"lr": 2e-4, "clip_norm": 1.0},
}


def cfg_with(*overrides):
    return load_training_config(None, [f"{k}={json.dumps(v)}" for k, v in _flat(BASE)] + list(overrides))


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_templates_are_valid_deepspeed_configs(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    stage = 3 if name.startswith("zero3") else int(name[-1])
    cfg = cfg_with(f"parallel.zero_stage={stage}", f"deepspeed.offload={str(name.endswith('offload')).lower()}")
    ds = build_ds_config(cfg, dp_size=1, grad_accum=check_world(cfg, 1), on_cpu=True)
    # DeepSpeed's own parser and batch-size consistency check (outside a process group it assumes one rank)
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == stage
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) \
        == (64, 8, 8)


def test_yaml_fills_batch_precision_optimizer_and_clipping():
    cfg = cfg_with("parallel.zero_stage=2", "precision=fp16", "loss_scale.loss_scale_window=256")
    ds = build_ds_config(cfg, dp_size=4, grad_accum=check_world(cfg, 4), on_cpu=False)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                            "weight_decay": 0.01}}
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    assert ds["fp16"]["loss_scale_window"] == 256 and ds["fp16"]["initial_scale_power"] == 7
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True  # template kept
    assert "scheduler" not in ds


def test_cpu_runs_use_torch_adamw_and_unpinned_offload():
    cfg = cfg_with("parallel.zero_stage=3", "deepspeed.offload=true")
    ds = build_ds_config(cfg, dp_size=1, grad_accum=8, on_cpu=True)
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["offload_param"]["pin_memory"] is False
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert default_template(3, True).name == "zero3_offload.json" and default_template(0, False).name == "zero1.json"


@pytest.mark.parametrize("template_patch, message", [
    ({"train_batch_size": 128}, "sets train_batch_size=128 but the YAML gives 64; remove train_batch_size"),
    ({"zero_optimization": {"stage": 2}}, "sets zero_optimization.stage=2 but the YAML gives 3"),
    ({"bf16": {"enabled": True}}, "sets bf16.enabled=true but the YAML gives false"),
    ({"gradient_clipping": 5.0}, "sets gradient_clipping=5.0 but the YAML gives 1.0"),
    ({"scheduler": {"type": "WarmupLR"}}, "sets 'scheduler'; remove it"),
])
def test_conflicting_template_values_are_refused(tmp_path, template_patch, message):
    base = json.loads((TEMPLATE_DIR / "zero3.json").read_text())
    base.update(template_patch)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(base))
    cfg = cfg_with("parallel.zero_stage=3", f"deepspeed.template={path}")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        build_ds_config(cfg, dp_size=1, grad_accum=8, on_cpu=True)


def test_agreeing_template_values_are_accepted(tmp_path):
    base = json.loads((TEMPLATE_DIR / "zero3.json").read_text())
    base.update({"train_batch_size": 64, "gradient_clipping": 1.0, "bf16": {"enabled": False}})
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(base))
    cfg = cfg_with("parallel.zero_stage=3", f"deepspeed.template={path}")
    assert build_ds_config(cfg, dp_size=1, grad_accum=8, on_cpu=True)["train_batch_size"] == 64


def test_missing_template_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.template .* does not exist"):
        cfg_with(f"deepspeed.template={tmp_path / 'nope.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cfg = cfg_with(f"deepspeed.template={bad}")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        build_ds_config(cfg, dp_size=1, grad_accum=8, on_cpu=True)


def test_yaml_files_in_configs_are_valid(tmp_path):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "configs"
    names = sorted(p.name for p in configs.glob("*.yaml"))
    assert {"demo.yaml", "pretrain_ofa_base.yaml", "pretrain_ofa_huge.yaml"} <= set(names)
    for name in ("pretrain_ofa_base.yaml", "pretrain_ofa_huge.yaml", "demo.yaml"):
        data = yaml.safe_load((configs / name).read_text())
        cfg = load_training_config(configs / name)
        assert cfg.model.arch == data["model"]["arch"]

"""Finetuning config and workload, before any process group: one-sentence refusals, updates from epochs, the
loader's exact epochs, the best pointer and pruning. Fast (no DeepSpeed engine)."""

from __future__ import annotations

import copy
import json
import os

import pytest

from ofa_scale.errors import ConfigError, UserError
from tests.finetune.engine_data import caption_shards, finetune_config
from tests.finetune.engine_fake_task import install


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_config")
    return {"train": caption_shards(root, "train", 14), "valid": caption_shards(root, "valid", 4), "root": root}


@pytest.fixture(autouse=True)
def fake_task(monkeypatch):
    from ofa_scale.finetune import task as task_module

    monkeypatch.setattr(task_module, "_REGISTRY", dict(task_module._REGISTRY))
    install()


def _load(cfg: dict, *overrides: str):
    from ofa_scale.training.config import TrainingConfig
    from ofa_scale.utils.config import apply_overrides, from_dict

    loaded = from_dict(TrainingConfig, apply_overrides(copy.deepcopy(cfg), list(overrides)))
    loaded.validate()
    return loaded


def _error(cfg: dict, *overrides: str) -> str:
    with pytest.raises((ConfigError, UserError)) as e:
        _load(cfg, *overrides)
    msg = str(e.value)
    assert "\n" not in msg  # one sentence, no traceback
    return msg


def test_config_refusals_name_the_fix(shards):
    cfg = finetune_config(shards["train"], shards["valid"])
    assert "data.train is missing" in _error(cfg, "data.train=")
    assert "data.valid is missing" in _error(cfg, "data.valid=")
    assert "task.name is 'captions'" in _error(cfg, "task.name=captions")
    msg = _error(cfg, "task.criterion=scst", "parallel.pp=2")
    assert "parallel.pp=2" in msg and "SCST" in msg and "pp=1" in msg
    msg = _error(cfg, "parallel.pp=2")
    assert "validation generates" in msg
    assert "remove data.root" in _error(cfg, f"data.root={shards['train']}")
    assert "train.epochs is 0" in _error(cfg, "train.epochs=0")
    assert "task.criterion=scst" in _error(cfg, "task.criterion=scst", "task.name=vqa")
    # pretraining keeps its own requirements and refuses the finetuning-only fields
    pre = {k: v for k, v in cfg.items() if k != "task"}
    pre["data"] = {**cfg["data"], "train": "", "valid": "", "root": str(shards["train"])}
    assert "train.epochs is a finetuning setting" in _error(pre, "train.steps=5")
    assert "objectives.drop_worst_ratio" in _error(pre, "train.steps=5", "train.epochs=0",
                                                   "objectives.drop_worst_ratio=0.2")
    # drop-worst is a finetuning option: accepted there
    assert _load(cfg, "objectives.drop_worst_ratio=0.2").objectives.drop_worst_ratio == 0.2


def test_updates_come_from_epochs_and_train_steps_caps_them(shards):
    from ofa_scale.finetune.workload import FinetuneWorkload

    cfg = _load(finetune_config(shards["train"], shards["valid"]))
    w = FinetuneWorkload(cfg)
    # 14 samples, global batch 4: 3 full global batches per epoch (the loader drops the 2 left over)
    assert w.train_samples == 14 and w.steps_per_epoch == 3
    assert w.cfg.train.steps == 2 * 3 and cfg.train.steps == 0  # the resolved copy; the loaded config untouched
    assert FinetuneWorkload(_load(finetune_config(shards["train"], shards["valid"]), "train.steps=4")
                            ).cfg.train.steps == 4
    assert FinetuneWorkload(_load(finetune_config(shards["train"], shards["valid"]), "train.steps=50")
                            ).cfg.train.steps == 6
    with pytest.raises(ConfigError, match="task.best_metric is 'cider'; task caption reports match, length"):
        FinetuneWorkload(_load(finetune_config(shards["train"], shards["valid"]), "task.best_metric=cider"))
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps=6 must be in \[0, 6\)"):
        FinetuneWorkload(_load(finetune_config(shards["train"], shards["valid"]), "schedule.warmup_steps=6"))
    with pytest.raises(UserError, match="holds no manifest.json"):
        FinetuneWorkload(_load(finetune_config(shards["train"], shards["root"])))
    other = shards["root"] / "vqa_shards"
    other.mkdir(exist_ok=True)
    (other / "manifest.json").write_text(json.dumps({"sources": {"vqa": {"samples_written": 3}}}))
    with pytest.raises(UserError, match=r"holds no 'caption' shards \(it has: vqa\)"):
        FinetuneWorkload(_load(finetune_config(shards["train"], other)))


def test_loader_runs_exactly_the_epochs_and_batches_one_task_group(shards):
    from ofa_scale.finetune.workload import FinetuneWorkload

    w = FinetuneWorkload(_load(finetune_config(shards["train"], shards["valid"]), "train.epochs=3"))
    batches = list(w.build_loader(dp_rank=0, dp_size=1))
    assert len(batches) == 3 * 3 * 2  # epochs x steps per epoch x micro-batches per step
    for b in batches:
        assert set(b) == {"vl", "stats"}
        vl = b["vl"]
        assert vl["task_ids"].tolist() == [0, 0]  # the workload's only task
        assert tuple(vl["patch_images"].shape) == (2, 3, 32, 32)
        assert vl["src_tokens"].shape[1] == w.task.lengths()[0] and vl["target"].shape[1] == w.task.lengths()[1]
    # each epoch reads 12 distinct samples of the 14 (a new shuffle per epoch)
    assert w.build_loader(0, 1).total_steps == 9


def test_collator_refuses_a_task_it_does_not_batch():
    from ofa_scale.objectives.batching import Collator, Composition
    from ofa_scale.objectives.config import ObjectivesConfig

    obj = ObjectivesConfig(tasks=["caption"], mix={"vl": 1, "text": 0, "image": 0, "detection": 0})
    collate = Collator(obj, Composition.from_config(obj, 1), task_ids={"refcoco": 0})
    ex = {"task": "vqa", "source": [0, 5, 2], "target": [5, 2], "prev_output": [0, 5], "image": None,
          "patch_mask": False, "conf": 1.0}
    with pytest.raises(ValueError, match="batches refcoco examples"):
        collate([ex])
    assert collate([{**ex, "task": "refcoco"}])["vl"]["task_ids"].tolist() == [0]


def _fake_checkpoint(ckpt_dir, step: int) -> str:
    tag = f"step_{step:06d}"
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / "manifest.json").write_text("{}")
    return tag


def test_pruning_never_deletes_the_best_checkpoint(tmp_path):
    from ofa_scale.finetune.best import BestRecord, best_checkpoint, improves, publish_best
    from ofa_scale.training.checkpoint import _prune
    from ofa_scale.utils.io import atomic_write_text

    ckpt = tmp_path / "checkpoints"
    best = None
    for step, value in [(1, 0.2), (2, 0.5), (3, 0.4), (4, 0.1), (5, 0.3)]:
        tag = _fake_checkpoint(ckpt, step)
        atomic_write_text(ckpt / "latest", tag)
        if improves(best, value):
            best = BestRecord(tag, step, "cider", value)
            publish_best(tmp_path, best)
        _prune(ckpt, keep=1, current=tag)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000002", "step_000005"]
    assert best_checkpoint(tmp_path) == ckpt / "step_000002"
    assert json.loads((tmp_path / "best.json").read_text())["value"] == 0.5
    assert not improves(BestRecord.load(tmp_path, "cider"), 0.5) and improves(BestRecord.load(tmp_path, "cider"), 0.51)
    assert not improves(None, float("nan"))
    # no temp files left next to the pointer (atomic writes)
    assert sorted(os.listdir(ckpt)) == ["best", "latest", "step_000002", "step_000005"]


def test_best_record_survives_a_crash_between_best_json_and_the_pointer(tmp_path):
    from ofa_scale.finetune.best import BestRecord, publish_best
    from ofa_scale.utils.io import atomic_write_json

    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt, 2)
    _fake_checkpoint(ckpt, 4)
    publish_best(tmp_path, BestRecord("step_000002", 2, "cider", 0.5))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "valid/cider": 0.5}) + "\n")
    # best.json moved on to step 4, the pointer did not: the pointer is trusted, its value read from the metrics
    atomic_write_json(tmp_path / "best.json", {"format_version": 1, "tag": "step_000004", "step": 4,
                                              "metric": "cider", "value": 0.9})
    assert BestRecord.load(tmp_path, "cider") == BestRecord("step_000002", 2, "cider", 0.5)

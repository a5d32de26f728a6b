"""train.host_heap (issue 8 §4): which runs fix glibc's mmap threshold (utils/malloc.bound_heap_growth; its effect
is tested in tests/utils/test_malloc.py and measured by benchmarks/host_memory.py)."""

from __future__ import annotations

import pytest
import yaml

from ofa_scale.errors import ConfigError
from ofa_scale.training.config import load_training_config
from ofa_scale.training.trainer import bounds_heap

BASE = {
    "model": {"arch": "ofa_tiny"},
    "data": {"root": "/data/shards", "tokenizer": {"kind": "gpt2-bpe", "path": "/data/bpe"}},
    "train": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 4},
}


def config(tmp_path, *overrides):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return load_training_config(path, list(overrides))


@pytest.mark.parametrize("zero,mode,bounded", [(3, "auto", True), (2, "auto", False), (1, "auto", False),
                                               (0, "auto", False), (1, "bounded", True), (3, "dynamic", False)])
def test_auto_bounds_the_heap_under_zero3_only(tmp_path, zero, mode, bounded):
    cfg = config(tmp_path, f"parallel.zero_stage={zero}", f"train.host_heap={mode}")
    assert bounds_heap(cfg) is bounded


def test_the_default_is_auto(tmp_path):
    assert config(tmp_path).train.host_heap == "auto"


def test_an_unknown_mode_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="train.host_heap is 'small'; use one of auto, bounded, dynamic"):
        config(tmp_path, "train.host_heap=small")

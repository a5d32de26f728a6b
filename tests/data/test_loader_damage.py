"""Damaged shards are counted in ShardLoader.stats() (exactly, with workers, across resumes and world sizes),
truncated shards are caught against the manifest's counts, and data.verify_shards checks the sha256."""

import json
from collections import Counter
from pathlib import Path

import pytest
from damaged_shards import change_unread_byte, cut_after_samples, list_sha256
from shard_factory import write_dataset

from ofa_scale.data.loader import ShardLoader, merge_loader_states
from ofa_scale.data.loader_config import LoaderConfig
from ofa_scale.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def keys_of(batch):
    return [r["key"] for r in batch]


def summed(loaders) -> Counter:
    total = Counter()
    for lo in loaders:
        total.update(lo.stats())
    return total


def consume(loaders, steps):
    """`steps` global steps from every rank's loader; returns the keys each rank saw."""
    seen = []
    for lo in loaders:
        it = iter(lo)
        seen.append([k for _ in range(steps * lo.streams_per_rank) for k in keys_of(next(it))])
    return seen


@pytest.fixture
def truncated_root(tmp_path):
    """The probe's case: a 25-sample shard cut at a tar member boundary after 12 samples."""
    keys = write_dataset(tmp_path, {"vl": [25, 35]})["vl"]
    cut_after_samples(tmp_path / "vl" / "vl-000000.tar", 12)
    return tmp_path, keys


def test_truncated_shard_is_counted_against_the_manifest(truncated_root):
    root, keys = truncated_root
    cfg = LoaderConfig(root=str(root), composition={"vl": 3}, num_streams=4, mode="epochs", epochs=1,
                       shuffle_buffer=3)
    lo = ShardLoader(cfg)
    seen = [k for b in lo for k in keys_of(b)]
    assert len(seen) == 60  # every stream still yields its nominal length (refilled from its own slice)
    assert not set(seen) & set(keys[12:25])
    st = lo.stats()
    assert st["data/truncated_shards"] == st["data/vl/truncated_shards"] == 1
    assert st["data/missing_samples"] == 13 and st["data/refilled"] == 13
    assert st["data/corrupt_shards"] == st["data/skipped_samples"] == 0
    assert st["data/records"] == 60
    # The same totals from two ranks with workers: counts come back from the worker processes.
    cfg2 = LoaderConfig(**{**cfg.__dict__, "num_workers": 2})
    ranks = [ShardLoader(cfg2, rank=r, world_size=2) for r in range(2)]
    for rank in ranks:
        assert rank.num_workers == 2
        list(rank)
    assert summed(ranks) == Counter(st)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_fails_under_on_corrupt_fail(truncated_root, workers):
    root, _ = truncated_root
    cfg = LoaderConfig(root=str(root), composition={"vl": 2}, num_streams=2, mode="epochs", epochs=1,
                       shuffle_buffer=0, on_corrupt="fail", num_workers=workers)
    with pytest.raises(UserError, match="holds only 12 of the 25 samples") as err:
        list(ShardLoader(cfg))
    message = str(err.value)
    assert "data.on_corrupt=skip" in message and "loader.on_corrupt" not in message and "\n" not in message


def test_counts_are_the_same_on_any_world_size_and_worker_count(truncated_root):
    root, _ = truncated_root
    base = dict(root=str(root), composition={"vl": 3}, num_streams=4, seed=4, shuffle_buffer=4)
    steps = 10  # 10 x 3 records = two passes over a 15-record slice, each meeting the truncated shard
    one = ShardLoader(LoaderConfig(**base))
    consume([one], steps)
    expected = Counter(one.stats())
    assert expected["data/truncated_shards"] == 2 and expected["data/missing_samples"] == 26
    for world_size, workers in ((2, 0), (4, 0), (2, 2)):
        ranks = [ShardLoader(LoaderConfig(**base, num_workers=workers), rank=r, world_size=world_size)
                 for r in range(world_size)]
        consume(ranks, steps)
        assert summed(ranks) == expected, (world_size, workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_counts_survive_a_resume_and_leave_out_prefetched_batches(truncated_root, workers):
    root, _ = truncated_root
    cfg = LoaderConfig(root=str(root), composition={"vl": 3}, num_streams=2, seed=8, shuffle_buffer=4,
                       num_workers=workers, prefetch_factor=4)
    straight = ShardLoader(LoaderConfig(**{**cfg.__dict__, "num_workers": 0}))
    it = iter(straight)
    snapshots = []
    for _ in range(14):
        next(it)
        snapshots.append(straight.stats())
    assert snapshots[-1]["data/truncated_shards"] >= 1
    first = ShardLoader(cfg)
    it = iter(first)
    for _ in range(5):
        next(it)
    assert first.stats() == snapshots[4]  # what the workers read ahead is not counted yet
    state = json.loads(json.dumps(merge_loader_states([first.state_dict()])))
    del it
    resumed = ShardLoader(cfg)
    resumed.load_state_dict(state)
    assert resumed.stats() == snapshots[4]
    it = iter(resumed)
    for _ in range(9):
        next(it)
    assert resumed.stats() == snapshots[-1]


def test_states_saved_without_counts_still_load(truncated_root):
    root, _ = truncated_root
    cfg = LoaderConfig(root=str(root), composition={"vl": 1}, num_streams=2, shuffle_buffer=0)
    lo = ShardLoader(cfg)
    it = iter(lo)
    for _ in range(4):
        next(it)
    state = lo.state_dict()
    for stream in state["streams"].values():
        del stream["stats"]
    old = ShardLoader(cfg)
    old.load_state_dict(state)
    assert old.stats()["data/records"] == 0
    assert [keys_of(next(iter(old)))] == [keys_of(next(it))]


@pytest.fixture
def listed_root(tmp_path):
    keys = write_dataset(tmp_path, {"vl": [5, 5, 6]})["vl"]
    list_sha256(tmp_path)
    return tmp_path, keys


def _epoch(root, **kw):
    lo = ShardLoader(LoaderConfig(root=str(root), composition={"vl": 1}, num_streams=2, mode="epochs",
                                  shuffle_buffer=2, **kw))
    return lo, [k for b in lo for k in keys_of(b)]


def test_verify_shards_passes_intact_shards(listed_root):
    root, keys = listed_root
    lo, seen = _epoch(root, verify_shards=True, on_corrupt="fail", num_workers=2)
    assert sorted(seen) == sorted(keys)
    assert lo.stats()["data/corrupt_shards"] == lo.stats()["data/missing_samples"] == 0


def test_verify_shards_catches_a_shard_that_still_reads(listed_root):
    root, keys = listed_root
    change_unread_byte(root / "vl" / "vl-000001.tar")
    lo, seen = _epoch(root)  # the tar itself reads fine: only the sha256 tells
    assert sorted(seen) == sorted(keys) and lo.stats()["data/corrupt_shards"] == 0
    for workers in (0, 2):
        lo, seen = _epoch(root, verify_shards=True, num_workers=workers)
        assert len(seen) == 16 and not set(seen) & set(keys[5:10])
        st = lo.stats()
        assert st["data/vl/corrupt_shards"] == 1 and st["data/vl/missing_samples"] == 5
        with pytest.raises(UserError, match="does not match the sha256 manifest.json lists") as err:
            _epoch(root, verify_shards=True, on_corrupt="fail", num_workers=workers)
        assert "data.on_corrupt=skip" in str(err.value)


def test_verify_shards_needs_listed_hashes(tmp_path):
    write_dataset(tmp_path, {"vl": [3]})  # the factory's manifest lists no sha256
    with pytest.raises(UserError, match="data.verify_shards is on but no sha256 is listed"):
        _epoch(tmp_path, verify_shards=True)


def test_the_demo_verifies_shards_through_the_trainers_loader_config():
    from ofa_scale.training.config import load_training_config
    from ofa_scale.training.workload import OFAPretraining

    workload = object.__new__(OFAPretraining)  # loader_config() needs only the config, not the tokenizer
    workload.cfg = load_training_config(REPO / "configs" / "demo.yaml")
    workload.objectives = workload.cfg.objectives
    assert workload.loader_config().verify_shards is True
    workload.cfg.data.verify_shards = False
    assert workload.loader_config().verify_shards is False

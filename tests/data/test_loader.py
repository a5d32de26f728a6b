"""The streaming loader: epoch coverage, world-size and worker invariance, decode, damaged shards."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from shard_factory import colour_of, truncate, write_dataset

from ofa_scale.data.image_ops import to_uint8_tensor
from ofa_scale.data.loader import ShardLoader
from ofa_scale.data.loader_config import LoaderConfig
from ofa_scale.errors import ConfigError, UserError


def keys_of(batch):
    return [r["key"] for r in batch]


def global_steps(cfg, world_size, steps, **kw):
    """Per global step: the sorted (key, seed) pairs of all ranks' micro-batches."""
    loaders = [ShardLoader(cfg, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    per_step = []
    iters = [iter(lo) for lo in loaders]
    for _ in range(steps):
        union = []
        for lo, it in zip(loaders, iters):
            for _ in range(lo.streams_per_rank):
                union.extend((r["key"], r["seed"]) for r in next(it))
        per_step.append(sorted(union))
    return per_step


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    keys = write_dataset(root, {"vl": [9, 7, 8], "text": [20], "detection": [6, 6]})
    return root, keys


def test_epoch_coverage_two_ranks_two_workers(tmp_path):
    keys = write_dataset(tmp_path, {"vl": [7, 9, 8]})["vl"]  # 24 samples = 2 epochs' worth of 4 streams x 2 x 3
    cfg = LoaderConfig(root=str(tmp_path), composition={"vl": 2}, num_streams=4, mode="epochs", epochs=2,
                       shuffle_buffer=3, num_workers=2)
    per_rank = []
    for rank in range(2):
        lo = ShardLoader(cfg, rank=rank, world_size=2)
        assert lo.streams_per_rank == 2 and lo.num_workers == 2 and lo.steps_per_epoch == 3
        per_rank.append([keys_of(b) for b in lo])
        assert lo.stats()["data/vl/dropped_epoch_remainder"] == 0
    assert len(per_rank[0]) == len(per_rank[1]) == 2 * 3 * 2  # epochs x steps x micro-batches per step
    epochs = [[], []]
    for batches in per_rank:
        for index, batch in enumerate(batches):
            epochs[index // 6].extend(batch)
    for seen in epochs:
        assert sorted(seen) == sorted(keys)  # every sample exactly once per epoch
    assert epochs[0] != epochs[1]  # and a new order each epoch


def test_uneven_epoch_drops_and_counts_the_remainder_on_every_rank_alike(tmp_path):
    keys = write_dataset(tmp_path, {"vl": [11, 4], "text": [9]})  # 15 vl: 4 streams x 2 x 1 step = 8 used
    cfg = LoaderConfig(root=str(tmp_path), composition={"vl": 2, "text": 1}, num_streams=4, mode="epochs",
                       epochs=1, shuffle_buffer=2)
    seen = Counter()
    counts, dropped = [], Counter()
    for rank in range(2):
        lo = ShardLoader(cfg, rank=rank, world_size=2)
        batches = list(lo)
        counts.append(len(batches))
        for b in batches:
            seen.update(keys_of(b))
        for source in ("vl", "text"):
            dropped[source] += lo.stats()[f"data/{source}/dropped_epoch_remainder"]
    assert counts == [2, 2]
    assert max(seen.values()) == 1
    assert sum(1 for k in seen if "-vl_" in k) + dropped["vl"] == len(keys["vl"])
    assert sum(1 for k in seen if "-text_" in k) + dropped["text"] == len(keys["text"])


def test_global_batches_do_not_depend_on_world_size(mixed_root):
    root, _ = mixed_root
    cfg = LoaderConfig(root=str(root), composition={"vl": 2, "text": 1, "detection": 1}, num_streams=4,
                       seed=11, shuffle_buffer=4)
    one = global_steps(cfg, 1, 7)  # 7 steps x 8 vl > 24: crosses into the second pass
    assert global_steps(cfg, 2, 7) == one
    rank1 = ShardLoader(cfg, rank=1, world_size=2)
    steps = [step for _, step in zip(range(2), rank1.iter_steps())]
    assert [len(s) for s in steps] == [2, 2] and rank1.step == 2
    assert global_steps(cfg, 4, 7) == one
    other_seed = LoaderConfig(**{**cfg.__dict__, "seed": 12})
    assert global_steps(other_seed, 1, 7) != one


def test_workers_yield_the_same_order_as_one_process(mixed_root):
    root, _ = mixed_root
    base = dict(root=str(root), composition={"vl": 1, "text": 2}, num_streams=4, shuffle_buffer=5)
    ref = ShardLoader(LoaderConfig(**base))
    it = iter(ref)
    expected = [keys_of(next(it)) for _ in range(12)]
    for workers in (2, 3):  # 3 does not divide 4 streams: falls back to 2
        lo = ShardLoader(LoaderConfig(**base, num_workers=workers))
        it = iter(lo)
        assert [keys_of(next(it)) for _ in range(12)] == expected
    assert lo.num_workers == 2


def _serialised(x):
    return json.loads(json.dumps(x))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_samples(mixed_root, workers):
    root, _ = mixed_root
    cfg = LoaderConfig(root=str(root), composition={"vl": 2, "detection": 1}, num_streams=2, seed=3,
                       shuffle_buffer=6, num_workers=workers, prefetch_factor=3)
    straight = ShardLoader(cfg)
    it = iter(straight)
    expected = [keys_of(next(it)) for _ in range(16)]
    del it

    first = ShardLoader(cfg)
    it = iter(first)
    got = [keys_of(next(it)) for _ in range(7)]  # mid-step (7 of 2-per-step) and with workers prefetching ahead
    state = _serialised(first.state_dict())
    del it
    resumed = ShardLoader(cfg)
    resumed.load_state_dict(state)
    got += [keys_of(b) for _, b in zip(range(9), resumed)]
    assert got == expected


def test_resume_on_another_world_size_from_merged_states(mixed_root):
    from ofa_scale.data.loader import merge_loader_states

    root, _ = mixed_root
    cfg = LoaderConfig(root=str(root), composition={"vl": 2, "text": 1}, num_streams=4, seed=5,
                       shuffle_buffer=3, mode="epochs", epochs=3)
    expected = global_steps(cfg, 1, 6)
    # Two ranks consume 4 global steps and save; one rank continues for 2 more.
    ranks = [ShardLoader(cfg, rank=r, world_size=2) for r in range(2)]
    its = [iter(lo) for lo in ranks]
    for _ in range(4 * 2):
        for it in its:
            next(it)
    merged = _serialised(merge_loader_states([lo.state_dict() for lo in ranks]))
    with pytest.raises(UserError, match="merge_loader_states"):
        ShardLoader(cfg).load_state_dict(ranks[0].state_dict())
    single = ShardLoader(cfg)
    single.load_state_dict(merged)
    assert single.step == 4
    it = iter(single)
    tail = [sorted((r["key"], r["seed"]) for _ in range(4) for r in next(it)) for _ in range(2)]
    assert tail == expected[4:]


def test_records_follow_the_interface_and_drafts_rescale_boxes(tmp_path):
    write_dataset(tmp_path, {"vl": [3], "detection": [3]}, image_size=(1000, 800))
    cfg = LoaderConfig(root=str(tmp_path), composition={"vl": 1, "detection": 1}, num_streams=1,
                       decode_min_size={"vl": 200}, shuffle_buffer=0)
    records = next(iter(ShardLoader(cfg)))
    vl, det = records
    assert set(vl) == {"source", "key", "meta", "image", "seed"}
    assert vl["source"] == "vl" and isinstance(vl["seed"], int)
    assert vl["meta"]["uniq_id"].startswith("vl.id#")
    # vl decoded at 1/4 scale (shorter side 200 >= min size); boxes and sizes follow the image.
    assert vl["image"].size == (250, 200)
    assert vl["meta"]["image"]["width"] == 250 and vl["meta"]["image"]["height"] == 200
    assert vl["meta"]["image"]["scale"] == pytest.approx(0.25)
    assert vl["meta"]["box"] == pytest.approx([62.5, 50.0, 187.5, 100.0])
    line = vl["meta"]["line"]
    assert all(abs(a - b) <= 6 for a, b in zip(vl["image"].getpixel((10, 10)), colour_of(line)))
    # detection has no minimum set: full size, boxes untouched.
    assert det["image"].size == (1000, 800)
    assert det["meta"]["objects"][0]["box"] == [250.0, 200.0, 750.0, 400.0]


def test_fine_tuning_source_with_boxes(tmp_path):
    write_dataset(tmp_path, {"refcoco": [2]}, image_size=(800, 600))
    cfg = LoaderConfig(root=str(tmp_path), composition={"refcoco": 1}, num_streams=1, shuffle_buffer=0,
                       decode_min_size={"refcoco": 300})
    (record,) = next(iter(ShardLoader(cfg)))
    assert record["image"].size == (400, 300)
    assert record["meta"]["box"] == pytest.approx([100.0, 75.0, 300.0, 150.0])


def _to_example(record):
    # A picklable consumer: two examples per record, as the vl builders do.
    image = to_uint8_tensor(record["image"].resize((8, 8)))
    return [{"image": image, "seed": record["seed"]}, {"image": image, "seed": record["seed"] + 1}]


def _stack(examples):
    return {"patch_images": torch.stack([e["image"] for e in examples]),
            "seeds": torch.tensor([e["seed"] % 1000 for e in examples])}


def test_record_fn_and_collate_run_in_workers(mixed_root):
    root, _ = mixed_root
    base = dict(root=str(root), composition={"vl": 3}, num_streams=2, shuffle_buffer=2)
    ref = [b for _, b in zip(range(4), ShardLoader(LoaderConfig(**base), record_fn=_to_example,
                                                     collate_fn=_stack))]
    got = [b for _, b in zip(range(4), ShardLoader(LoaderConfig(**base, num_workers=2), record_fn=_to_example,
                                                     collate_fn=_stack))]
    assert got[0]["patch_images"].shape == (6, 3, 8, 8) and got[0]["patch_images"].dtype == torch.uint8
    for a, b in zip(ref, got):
        assert torch.equal(a["patch_images"], b["patch_images"]) and torch.equal(a["seeds"], b["seeds"])


def test_truncated_shard_is_skipped_counted_and_refilled(tmp_path):
    keys = write_dataset(tmp_path, {"vl": [6, 6]})["vl"]
    truncate(Path(tmp_path) / "vl" / "vl-000001.tar", 0.5)
    cfg = LoaderConfig(root=str(tmp_path), composition={"vl": 2}, num_streams=2, mode="epochs", epochs=1,
                       shuffle_buffer=0)
    lo = ShardLoader(cfg)
    batches = [keys_of(b) for b in lo]
    assert len(batches) == 6  # every stream still yields its nominal length
    st = lo.stats()
    assert st["data/vl/corrupt_shards"] == st["data/corrupt_shards"] == 1 and st["data/refilled"] > 0
    readable = set(keys[:6])
    seen = [k for b in batches for k in b]
    assert readable <= set(seen)
    assert set(seen) < set(keys)
    for workers in (0, 2):
        with pytest.raises(UserError, match="data.on_corrupt=skip") as err:
            list(ShardLoader(LoaderConfig(**{**cfg.__dict__, "on_corrupt": "fail", "num_workers": workers})))
        assert "\n" not in str(err.value)  # one line, even from a worker process


def test_undecodable_image_is_counted(tmp_path):
    import webdataset as wds

    write_dataset(tmp_path, {"vl": [4]})
    good = list(wds.WebDataset(str(tmp_path / "vl" / "vl-000000.tar"), shardshuffle=False,
                               nodesplitter=None, workersplitter=None))
    with wds.TarWriter(str(tmp_path / "vl" / "vl-000000.tar")) as sink:
        for i, s in enumerate(good):
            sample = {"__key__": s["__key__"], "json": s["json"], "jpg": s["jpg"] if i != 1 else b"not a jpeg"}
            sink.write(sample)
    cfg = LoaderConfig(root=str(tmp_path), composition={"vl": 1}, num_streams=1, mode="epochs", epochs=1,
                       shuffle_buffer=0)
    lo = ShardLoader(cfg)
    seen = [k for b in lo for k in keys_of(b)]
    assert lo.stats()["data/vl/skipped_samples"] == lo.stats()["data/skipped_samples"] == 1
    assert good[1]["__key__"] not in seen and len(seen) == 4


def test_rank_comes_from_arguments_not_environment(mixed_root, monkeypatch):
    root, _ = mixed_root
    cfg = LoaderConfig(root=str(root), composition={"text": 1}, num_streams=2, shuffle_buffer=0)
    expected = [keys_of(b) for _, b in zip(range(3), ShardLoader(cfg, rank=1, world_size=2))]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert [keys_of(b) for _, b in zip(range(3), ShardLoader(cfg, rank=1, world_size=2))] == expected


def test_user_errors(mixed_root, tmp_path):
    root, _ = mixed_root
    cfg = LoaderConfig(root=str(root), composition={"vl": 1}, num_streams=4)
    with pytest.raises(UserError, match="not divisible"):
        ShardLoader(cfg, world_size=3)
    with pytest.raises(ConfigError, match="folder names"):
        ShardLoader(LoaderConfig(root=str(root), composition={"../vl": 1}))
    with pytest.raises(UserError, match="not in"):
        ShardLoader(LoaderConfig(root=str(root), composition={"pictures": 1}))
    with pytest.raises(UserError, match="does not exist"):
        ShardLoader(LoaderConfig(root=str(tmp_path / "nope"), composition={"vl": 1}))
    with pytest.raises(UserError, match="not in"):
        ShardLoader(LoaderConfig(root=str(root), composition={"image": 1}))
    with pytest.raises(UserError, match="fewer than one global batch"):
        ShardLoader(LoaderConfig(root=str(root), composition={"detection": 4}, num_streams=4, mode="epochs"))
    with pytest.raises(UserError, match="fewer than the 16 canonical streams"):
        ShardLoader(LoaderConfig(root=str(root), composition={"detection": 1}, num_streams=16))
    state = ShardLoader(cfg).state_dict()
    with pytest.raises(UserError, match="seed"):
        ShardLoader(LoaderConfig(**{**cfg.__dict__, "seed": 99})).load_state_dict(state)


def test_catalog_without_manifest_counts_tar_members(tmp_path):
    write_dataset(tmp_path, {"text": [5, 3]}, manifest=False)
    lo = ShardLoader(LoaderConfig(root=str(tmp_path), composition={"text": 2}, num_streams=2, mode="epochs"))
    assert lo.catalogs["text"].num_samples == 8 and lo.steps_per_epoch == 2
    assert len({k for b in lo for k in keys_of(b)}) == 8


def test_resume_through_refill_rounds_and_reiteration(tmp_path):
    write_dataset(tmp_path, {"vl": [5, 7, 6]})
    truncate(Path(tmp_path) / "vl" / "vl-000001.tar", 0.4)
    cfg = LoaderConfig(root=str(tmp_path), composition={"vl": 3}, num_streams=2, shuffle_buffer=4, seed=9)
    straight = ShardLoader(cfg)
    expected = [keys_of(b) for _, b in zip(range(14), straight)]
    assert straight.stats()["data/vl/refilled"] > 0
    first = ShardLoader(cfg)
    got = [keys_of(b) for _, b in zip(range(5), first)]
    got += [keys_of(b) for _, b in zip(range(4), first)]  # iterating again continues where it stopped
    resumed = ShardLoader(cfg)
    resumed.load_state_dict(_serialised(first.state_dict()))
    got += [keys_of(b) for _, b in zip(range(5), resumed)]
    assert got == expected

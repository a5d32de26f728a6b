"""The loader over shards written by the real converter from the sample corpus."""

import json

import pytest

from ofa_scale.data.convert import convert
from ofa_scale.data.loader import ShardLoader
from ofa_scale.data.loader_config import LoaderConfig
from ofa_scale.data.sample_corpus import write_sample_corpus


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("conv")
    paths = write_sample_corpus(base / "corpus", rows=48, seed=1)  # 48 vl, 12 text, 6 image, 6 detection rows
    manifest = convert(base / "shards", vl=paths["vision_language_examples.tsv"],
                       text=paths["text_examples.tsv"], image=paths["image_examples.tsv"],
                       detection=paths["detection_examples.tsv"], negatives=base / "corpus" / "negative_sample",
                       workers=1)
    return base / "shards", manifest


def test_one_epoch_reads_every_converted_sample_once(converted):
    root, manifest = converted
    cfg = LoaderConfig(root=str(root), composition={"vl": 8, "text": 2, "image": 1, "detection": 1},
                       num_streams=2, mode="epochs", epochs=1, num_workers=2, shuffle_buffer=4,
                       decode_min_size={"vl": 48, "detection": 48}, verify_shards=True, on_corrupt="fail")
    loaders = [ShardLoader(cfg, rank=r, world_size=2) for r in range(2)]
    seen: dict[str, list[str]] = {}
    for lo in loaders:
        for batch in lo:
            assert [r["source"] for r in batch] == ["vl"] * 8 + ["text"] * 2 + ["image", "detection"]
            for r in batch:
                seen.setdefault(r["source"], []).append(r["meta"]["uniq_id"])
                if r["image"] is not None:
                    info = r["meta"]["image"]
                    assert (info["width"], info["height"]) == r["image"].size
                    assert min(r["image"].size) >= min(48, info["orig_width"], info["orig_height"])
                    boxes = [o["box"] for o in r["meta"].get("objects", [])] + (
                        [r["meta"]["box"]] if r["meta"].get("box") else [])
                    for x0, y0, x1, y1 in boxes:
                        assert 0 <= x0 < x1 <= info["width"] + 0.5 and 0 <= y0 < y1 <= info["height"] + 0.5
    for source, info in manifest["sources"].items():
        assert len(seen[source]) == len(set(seen[source])) == info["samples_written"], source
    assert all(lo.stats()[f"data/{s}/dropped_epoch_remainder"] == 0 for lo in loaders for s in seen)
    state = json.loads(json.dumps(loaders[0].state_dict()))
    assert state["streams"]["0"]["step"] == loaders[0].total_steps == 3

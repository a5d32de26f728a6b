"""Issue 8 §4: the layout-free checkpoint is written in slices by every rank (no rank gathers the model and its
Adam moments) and read back in slices (a rank reads only what its layout needs). The runs are the session's
layout runs (conftest.layout_runs); the loss continuity and bit-exact round trips are in test_equivalence.py."""

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from ofa_scale.parallel.canonical_store import INDEX, KINDS


def index_of(directory) -> dict:
    return json.loads((Path(directory) / INDEX).read_text())


def rank_keys(directory, rank: int) -> set[str]:
    keys = set()
    for f in Path(directory).glob(f"rank-{rank:05d}-*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


def piece_numel(shape, piece) -> int:
    return math.prod(shape) // shape[piece["dim"]] * piece["length"] if piece["dim"] is not None else math.prod(shape)


@pytest.mark.parametrize("name", ["tp2dp2z3", "tp2pp2"])
def test_each_rank_writes_only_its_own_slices_once(layout_runs, name):
    directory = layout_runs[name]["params"]["save_dir"]
    ranks = layout_runs[name]["ranks"]
    index = index_of(directory)
    tensors = index["tensors"]
    assert {t.split("/")[0] for t in tensors} == set(KINDS)
    # every value is written exactly once: the pieces of a tensor add up to its size (the reader checks cover)
    for t, info in tensors.items():
        assert sum(piece_numel(info["shape"], p) for p in info["pieces"]) == math.prod(info["shape"]), t
    by_rank: dict[int, list] = {r: [] for r in range(len(ranks))}
    for t, info in tensors.items():
        for p in info["pieces"]:
            by_rank[int(p["file"][5:10])].append((t, info["shape"], p))
    total = sum(4 * math.prod(info["shape"]) for t, info in tensors.items())  # fp32 (statistics: ~0)
    for rank, result in enumerate(ranks):
        pieces = by_rank[rank]
        assert rank_keys(directory, rank) == {p["key"] for _, _, p in pieces}
        for t, shape, p in pieces:
            if p["dim"] is not None:  # a tensor-parallel slice: this rank's own
                per = -(-shape[p["dim"]] // 2)
                assert p["offset"] == result["tp_rank"] * per, (rank, t)
            if result["pp_rank"] == 0 and name == "tp2pp2":  # stage 0: the embedding and the ResNet stem only
                assert ".layers." not in t and not t.split("/")[1].startswith("decoder."), (rank, t)
            if result["pp_rank"] == 1:
                assert "embed_images" not in t, (rank, t)
            if t.startswith("model/") and "running_" in t:
                assert result["dp_rank"] == 0  # BatchNorm statistics of data-parallel rank 0
        written = sum(4 * piece_numel(shape, p) for _, shape, p in pieces)
        assert written > 0 and result["save"]["peak_buffered"] <= written + 1024  # it buffered its own share only
        if name == "tp2dp2z3":  # one stage: the writing is spread evenly, ZeRO-3's data-parallel ranks included
            assert 0.6 * total / 4 < written < 1.4 * total / 4, (rank, written / total)
        assert written < 0.6 * total  # (with pp=2, stage 0 holds the ResNet stem: most of the model)


def test_a_resumed_rank_reads_only_its_slices(layout_runs):
    """tp=1 checkpoint resumed as tp=2 x pp=2: each rank reads the fp32 weights and two Adam moments of its own
    parameters (its tensor-parallel slices, its stage's tensors) and nothing else."""
    total = sum(4 * math.prod(info["shape"]) for info in index_of(layout_runs["ref"]["params"]["save_dir"])
                ["tensors"].values())
    for r in layout_runs["tp1->tp2pp2"]["ranks"]:
        own = 3 * 4 * r["local_params"]  # (vocabulary padding: not read; BatchNorm statistics: read on stage 0)
        assert 0.99 * own < r["bytes_read"] < 1.01 * own, (r["bytes_read"], own)
        if r["pp_rank"] == 1:  # the decoder stage: a few percent of a model whose ResNet stem sits on stage 0
            assert r["bytes_read"] < 0.1 * total

"""The layout-free checkpoint's files and index (ofa_scale/parallel/canonical_store.py) and the owner assignment
(canonical.assign_owners), in one process: slices written by several "ranks" read back as any slice."""

import json
from types import SimpleNamespace

import pytest
import torch

from ofa_scale.errors import UserError
from ofa_scale.parallel.canonical import assign_owners, load_model_weights
from ofa_scale.parallel.canonical_store import (INDEX, MODEL, CanonicalReader, ShardWriter, read_canonical,
                                                write_full, write_index)


def full_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(5, 3, generator=g),       # split along dim 0 in 2 with padding: rows 0-2 | 3-4
        "proj": torch.randn(4, 6, generator=g),      # split along dim 1: columns 0-2 | 3-5
        "bias": torch.randn(4, generator=g),         # replicated
        "bn.num_batches_tracked": torch.tensor(7),   # a scalar statistic, int64
    }


def write_two_ranks(directory):
    t = full_tensors()
    w0, w1 = ShardWriter(directory, 0), ShardWriter(directory, 1)
    w0.add("model/emb", t["emb"][:3], (5, 3), dim=0, offset=0)
    w1.add("model/emb", t["emb"][3:], (5, 3), dim=0, offset=3)
    w0.add("model/proj", t["proj"][:, :3], (4, 6), dim=1, offset=0)
    w1.add("model/proj", t["proj"][:, 3:], (4, 6), dim=1, offset=3)
    w1.add("model/bias", t["bias"], (4,))
    w0.add("model/bn.num_batches_tracked", t["bn.num_batches_tracked"], ())
    w0.add("exp_avg/bias", 2 * t["bias"], (4,))
    write_index(directory, [w0.close(), w1.close()], {"optimizer_step": 3, "layout": None, "extra": {"step": 3},
                                                      "model": None})
    return t


def test_slices_of_two_ranks_read_back_as_any_slice(tmp_path):
    t = write_two_ranks(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("rank-*")) == ["rank-00000-000.safetensors",
                                                              "rank-00001-000.safetensors"]
    reader = CanonicalReader(tmp_path)
    assert reader.meta["optimizer_step"] == 3 and reader.meta["extra"] == {"step": 3}
    model = reader.view(MODEL)
    for name, full in t.items():
        got = model.read(name)
        assert got.dtype == full.dtype and torch.equal(got, full), name
    # a tp=2 rank's slice with vocabulary padding: rows 3-5, the last past the end reads as zeros
    assert torch.equal(model.read("emb", 0, 3, 3), torch.cat([t["emb"][3:], torch.zeros(1, 3)]))
    # a slice along another dimension than the pieces were cut along (crosses both ranks' pieces)
    assert torch.equal(model.read("emb", 1, 1, 2), t["emb"][:, 1:3])
    assert torch.equal(model.read("proj", 0, 1, 2), t["proj"][1:3])
    assert torch.equal(model.read("proj", 1, 2, 3), t["proj"][:, 2:5])
    weights, moments, meta = read_canonical(tmp_path)
    assert weights.keys() == t.keys() and moments["exp_avg"].keys() == {"bias"} and moments["exp_avg_sq"] == {}
    assert torch.equal(moments["exp_avg"]["bias"], 2 * t["bias"])


def test_a_slice_reads_only_the_pieces_it_overlaps(tmp_path):
    t = write_two_ranks(tmp_path)
    reader = CanonicalReader(tmp_path)
    reader.read("model/emb", 0, 3, 3)
    assert set(reader._files) == {"rank-00001-000.safetensors"}
    assert reader.bytes_read == t["emb"][3:].numel() * 4
    reader.read("model/proj", 1, 0, 3)
    assert reader.bytes_read == (t["emb"][3:].numel() + t["proj"][:, :3].numel()) * 4


def test_missing_pieces_and_unknown_formats_are_user_errors(tmp_path):
    write_two_ranks(tmp_path)
    index = json.loads((tmp_path / INDEX).read_text())
    index["tensors"]["model/emb"]["pieces"].pop()  # rank 1's rows lost
    (tmp_path / INDEX).write_text(json.dumps(index))
    reader = CanonicalReader(tmp_path)
    assert torch.equal(reader.read("model/emb", 0, 0, 3), full_tensors()["emb"][:3])  # rank 0's slice is whole
    with pytest.raises(UserError, match="cover 9 of the 15 values"):
        reader.read("model/emb")
    with pytest.raises(UserError, match="holds no tensor model/nothing"):
        reader.read("model/nothing")
    index["format_version"] = 1
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match="format version 1"):
        CanonicalReader(tmp_path)
    with pytest.raises(UserError, match="no index.json"):
        CanonicalReader(tmp_path / "elsewhere")


def test_a_writer_over_its_chunk_size_splits_its_file_and_buffers_little(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    writer = ShardWriter(tmp_path, 3, chunk_bytes=3000)
    for name, t in tensors.items():
        writer.add(f"model/{name}", t, t.shape)
    write_index(tmp_path, [writer.close()], {"optimizer_step": 0, "layout": None, "extra": {}, "model": None})
    assert len(list(tmp_path.glob("rank-00003-*.safetensors"))) == 4  # 3 + 3 + 3 + 1 tensors
    assert writer.peak_buffered == 3 * 1024
    got, _, _ = read_canonical(tmp_path)
    assert all(torch.equal(got[n], t) for n, t in tensors.items())


def test_owners_are_holders_and_the_bytes_are_spread():
    # 4 ranks = tp 2 x dp 2: split pieces are held by the 2 dp ranks of a tp rank, replicated ones by all 4
    holdings = [[] for _ in range(4)]
    for i in range(20):
        for rank in range(4):
            holdings[rank].append((f"split{i}", 100 * (rank % 2), 400 + i))
            holdings[rank].append((f"rep{i}", 0, 50 + i))
    owners = assign_owners(holdings)
    assert owners == assign_owners([list(reversed(h)) for h in holdings])  # independent of listing order
    load = [0] * 4
    for rank, pieces in enumerate(holdings):
        for name, offset, nbytes in pieces:
            if owners[(name, offset)] == rank:
                load[rank] += nbytes
    for (name, offset), rank in owners.items():
        assert name.startswith("rep") or offset == 100 * (rank % 2)
    assert len(owners) == 60 and sum(load) == sum(400 + i for i in range(20)) * 2 + sum(50 + i for i in range(20))
    assert max(load) / min(load) < 1.05


def test_a_tensor_parallel_rank_loads_its_slice(tmp_path):
    t = full_tensors()
    write_full(tmp_path, {n: t[n] for n in ("emb", "proj", "bias")})
    module = torch.nn.Module()
    module.emb = torch.nn.Parameter(torch.empty(3, 3))   # rank 1 of 2: rows 3-5 of 5 (one padding row)
    module.proj = torch.nn.Parameter(torch.empty(4, 3))  # columns 3-5
    module.bias = torch.nn.Parameter(torch.empty(4))
    ctx = SimpleNamespace(tp_size=2, tp_rank=1, split_params={"emb": 0, "proj": 1})
    reader = CanonicalReader(tmp_path)
    load_model_weights(ctx, module, reader.view(MODEL))
    assert torch.equal(module.emb.data, torch.cat([t["emb"][3:], torch.zeros(1, 3)]))
    assert torch.equal(module.proj.data, t["proj"][:, 3:]) and torch.equal(module.bias.data, t["bias"])
    assert reader.bytes_read == (2 * 3 + 4 * 3 + 4) * 4  # its slices only
    # full tensors in memory (a reference model) load the same way
    load_model_weights(ctx, module, {n: t[n] for n in ("emb", "proj", "bias")})
    assert torch.equal(module.proj.data, t["proj"][:, 3:])
    module.bias = torch.nn.Parameter(torch.empty(5))
    with pytest.raises(UserError, match="different model size"):
        load_model_weights(ctx, module, reader.view(MODEL))

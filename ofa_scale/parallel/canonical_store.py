"""On-disk format of the layout-free ("canonical") checkpoint: per-rank safetensors files of tensor slices plus one
index, so that no process ever has to hold every tensor to write or to read it.

    <dir>/rank-00003-000.safetensors   slices written by global rank 3 (a rank whose share exceeds `chunk_bytes`
                                      writes -001, -002, … so it never buffers more than that)
    <dir>/index.json                  written last, by global rank 0: its presence means the checkpoint is complete

index.json: {"format_version", "optimizer_step", "layout" (the writer's), "extra" (the caller's), "model" (OFAConfig
as a dict or null), "tensors": {"<kind>/<OFA name>": {"shape": full shape, "pieces": [{"file", "key", "dim",
"offset", "length"}]}}}. Kinds: "model" (fp32 weights and BatchNorm statistics), "exp_avg", "exp_avg_sq" (Adam's
moments). A piece holds the slice [offset, offset + length) of the full tensor along `dim` (the whole tensor when
`dim` is null); a tensor's pieces are disjoint and cover it.

`CanonicalReader.read` assembles any slice along one dimension from the pieces that overlap it, reading only
those byte ranges (`safe_open(...).get_slice`), so a tensor-parallel rank reads its own slice and a pipeline stage
only its stage's tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_file, atomic_write_json

FORMAT_VERSION = 2
INDEX = "index.json"
MODEL = "model"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
KINDS = (MODEL, *ADAM_KEYS)
CHUNK_BYTES = 256 << 20  # a rank buffers at most this much before writing a file


def entry(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def rank_file(rank: int, chunk: int) -> str:
    return f"rank-{rank:05d}-{chunk:03d}.safetensors"


class ShardWriter:
    """One rank's slices, written in files of at most about `chunk_bytes` each (atomically)."""

    def __init__(self, directory: str | Path, rank: int, chunk_bytes: int = CHUNK_BYTES):
        self.directory = Path(directory)
        self.rank = rank
        self.chunk_bytes = chunk_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._chunk = 0
        self.pieces: list[dict] = []  # {"tensor", "shape", "file", "key", "dim", "offset", "length"}
        self.bytes_written = 0
        self.peak_buffered = 0  # the most bytes of tensors this writer held at once

    def add(self, name: str, tensor: torch.Tensor, full_shape: Iterable[int], dim: Optional[int] = None,
            offset: int = 0) -> None:
        """Queue `tensor`, the slice [offset, offset + its size along dim) of tensor `name` (the whole of it when
        dim is None)."""
        tensor = tensor.detach().cpu().contiguous()
        self.pieces.append({"tensor": name, "shape": [int(s) for s in full_shape], "file": rank_file(self.rank,
                            self._chunk), "key": name, "dim": dim, "offset": int(offset),
                            "length": int(tensor.shape[dim]) if dim is not None else None})
        self._buffer[name] = tensor
        self._buffered += tensor.numel() * tensor.element_size()
        self.peak_buffered = max(self.peak_buffered, self._buffered)
        if self._buffered >= self.chunk_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        path = self.directory / rank_file(self.rank, self._chunk)
        buffer = self._buffer
        # written straight to the file: no serialised copy of the buffer in memory next to the tensors
        atomic_write_file(path, lambda tmp: save_file(buffer, tmp))
        self._buffer, self._buffered = {}, 0
        self.bytes_written += path.stat().st_size
        self._chunk += 1

    def close(self) -> list[dict]:
        """Write what is buffered; returns this rank's piece records (for the index)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._flush()
        return self.pieces


def write_index(directory: str | Path, piece_lists: Iterable[list[dict]], meta: dict[str, Any]) -> None:
    """index.json from every rank's piece records and the checkpoint's metadata (one process calls this)."""
    tensors: dict[str, dict] = {}
    for pieces in piece_lists:
        for p in pieces:
            record = tensors.setdefault(p["tensor"], {"shape": p["shape"], "pieces": []})
            if record["shape"] != p["shape"]:
                raise RuntimeError(f"ranks disagree on the shape of {p['tensor']}: {record['shape']} vs {p['shape']}")
            record["pieces"].append({k: p[k] for k in ("file", "key", "dim", "offset", "length")})
    atomic_write_json(Path(directory) / INDEX, {"format_version": FORMAT_VERSION, **meta,
                                                "tensors": dict(sorted(tensors.items()))}, indent=None)


def write_full(directory: str | Path, model: Mapping[str, torch.Tensor],
               moments: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
               meta: Optional[dict[str, Any]] = None) -> None:
    """A canonical checkpoint from full tensors held by one process (tools and tests)."""
    writer = ShardWriter(directory, 0)
    for kind, tensors in ((MODEL, model), *((moments or {}).items())):
        for name, t in tensors.items():
            writer.add(entry(kind, name), t, t.shape)
    defaults = {"optimizer_step": 0, "layout": None, "extra": {}, "model": None}
    write_index(directory, [writer.close()], {**defaults, **(meta or {})})


class CanonicalReader:
    """Reads slices of a canonical checkpoint directory (see the module docstring)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / INDEX
        if not path.is_file():
            raise UserError(f"{self.directory} is not a complete layout-free checkpoint (no {INDEX}); point at the "
                            f"canonical/ directory of a finished checkpoint")
        index = json.loads(path.read_text())
        if index.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.directory} has layout-free format version {index.get('format_version')}, this "
                            f"code reads {FORMAT_VERSION}; convert it with the matching ofa-scale version")
        self.tensors: dict[str, dict] = index.pop("tensors")
        self.meta: dict[str, Any] = index
        self._files: dict[str, Any] = {}
        self.bytes_read = 0  # tensor bytes read from the files so far

    def names(self, kind: str) -> list[str]:
        prefix = f"{kind}/"
        return [k[len(prefix):] for k in self.tensors if k.startswith(prefix)]

    def view(self, kind: str) -> "TensorView":
        return TensorView(self, kind)

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._files:
            self._files[file] = safe_open(str(self.directory / file), framework="pt")
        return self._files[file]

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, length: Optional[int] = None
             ) -> torch.Tensor:
        """Tensor `name` ("<kind>/<OFA name>"), or its slice [start, start + length) along `dim`. Positions past the
        tensor's end read as zeros (a tensor-parallel rank's vocabulary padding)."""
        if name not in self.tensors:
            raise UserError(f"{self.directory} holds no tensor {name}; it was written for a different model")
        info = self.tensors[name]
        shape = info["shape"]
        want = [(0, s) for s in shape]
        if dim is not None:
            want[dim] = (start, start + (shape[dim] - start if length is None else length))
        out: Optional[torch.Tensor] = None
        covered = 0
        for piece in info["pieces"]:
            have = [(0, s) for s in shape]
            if piece["dim"] is not None:
                have[piece["dim"]] = (piece["offset"], piece["offset"] + piece["length"])
            both = [(max(w0, h0), min(w1, h1)) for (w0, w1), (h0, h1) in zip(want, have)]
            if any(hi <= lo for lo, hi in both):
                continue
            handle = self._open(piece["file"])
            if shape:
                part = handle.get_slice(piece["key"])[tuple(slice(lo - h0, hi - h0)
                                                            for (lo, hi), (h0, _) in zip(both, have))]
            else:
                part = handle.get_tensor(piece["key"])
            if out is None:
                out = torch.zeros([w1 - w0 for w0, w1 in want], dtype=part.dtype)
            out[tuple(slice(lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(both, want))] = part
            covered += part.numel()
            self.bytes_read += part.numel() * part.element_size()
        inside = math.prod(max(0, min(w1, s) - w0) for (w0, w1), s in zip(want, shape))
        if out is None or covered != inside:
            raise UserError(f"{self.directory}: the pieces of {name} cover {covered} of the {inside} values asked "
                            f"for; a rank's file is missing or the index is damaged")
        return out


class TensorView:
    """One kind of a reader's tensors under plain OFA names (what the loaders in canonical.py consume)."""

    def __init__(self, reader: CanonicalReader, kind: str):
        self.reader, self.kind = reader, kind

    def __contains__(self, name: str) -> bool:
        return entry(self.kind, name) in self.reader.tensors

    def names(self) -> list[str]:
        return self.reader.names(self.kind)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.tensors[entry(self.kind, name)]["shape"])

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, length: Optional[int] = None
             ) -> torch.Tensor:
        return self.reader.read(entry(self.kind, name), dim, start, length)


class FullTensors:
    """The TensorView interface over full tensors already in memory (a reference model, a pretrained file)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        # a lazy mapping (model/init.py's InitialWeights) knows a shape without computing the tensor
        shape_of = getattr(self.tensors, "shape", None)
        return tuple(shape_of(name)) if callable(shape_of) else tuple(self.tensors[name].shape)

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, length: Optional[int] = None
             ) -> torch.Tensor:
        full = self.tensors[name]
        if dim is None:
            return full
        length = full.shape[dim] - start if length is None else length
        inside = max(0, min(length, full.shape[dim] - start))
        if inside == length:
            return full.narrow(dim, start, length)
        pad = list(full.shape)
        pad[dim] = length - inside
        return torch.cat([full.narrow(dim, start, inside), full.new_zeros(pad)], dim=dim)


def read_canonical(directory: str | Path) -> tuple[dict, dict, dict]:
    """(model tensors, {Adam key: tensors}, metadata), every tensor whole: for single-process tools (export, tests),
    never for a training rank."""
    reader = CanonicalReader(directory)
    whole = {kind: {n: view.read(n) for n in view.names()} for kind, view in ((k, reader.view(k)) for k in KINDS)}
    return whole[MODEL], {k: whole[k] for k in ADAM_KEYS}, reader.meta

"""`ofa-preprocess shards`: OFA TSVs (and img2dataset Parquet) -> validated webdataset shards (interfaces.md §1).

How it stays correct at scale:
* Inputs are cut into line-aligned byte ranges ("chunks") whose boundaries depend only on the file and
  `--chunk-mb`. Each chunk is converted by one worker into its own part shards; at the end the parts are
  renamed, in chunk order, to `<source>-%06d.tar`. Output bytes are therefore identical for any `--workers N`.
* Every line is either written or rejected with a reason (rows_read = samples_written + rejected).
* A progress file records each finished chunk with the sha256 of its parts; `--resume` keeps verified chunks and
  redoes the rest. manifest.json is written last, atomically, so its presence means the conversion is complete.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import glob
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import ofa_scale
from ofa_scale.data import parquet_input, rejects_tsv, shard_index, tsv_chunks
from ofa_scale.data.image_check import DEFAULT_MAX_PIXELS, check_image, decode_base64
from ofa_scale.data.shard_writer import ShardSequence, file_sha256, sample_key
from ofa_scale.data.tsv_formats import (BAD_UTF8, BLANK_LINE, BOX_OUTSIDE_IMAGE, BOX_TOLERANCE_PX, EMPTY_TEXT,
                                        FORMATS, MISSING_IMAGE, PRETRAIN_SOURCES, WRONG_IMAGE_SIZE, RowFormat,
                                        RowReject, get_format, iter_boxes)
from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
DEFAULT_SHARD_MB = 256.0
DEFAULT_CHUNK_MB = 512.0
PROGRESS_FILE = ".convert-progress.json"
PARTS_DIR = ".parts"
NEGATIVE_FILES = ("all_captions.txt", "object.txt", "type2ans.json")


# ----------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "tsv" | "parquet"


@dataclass
class Source:
    name: str
    format: str
    inputs: list[InputFile]


@dataclass(frozen=True)
class ChunkTask:
    source: str
    source_index: int
    format: str
    kind: str
    path: str
    start: int  # byte offset (tsv) or first row group (parquet)
    end: int
    chunk_id: int  # position of this chunk within its source
    first_line: int  # 1-based line (row) number in its file of the chunk's first line
    key_line_offset: int  # lines in this source's earlier files, so keys stay unique across files
    multi_file: bool  # the source has several input files: samples also name theirs (JSON "file")
    out: str
    shard_bytes: int
    downscale: int | None
    max_pixels: int


def _expand(patterns: Iterable[str | os.PathLike] | str | os.PathLike | None) -> list[str]:
    """Globs and plain paths -> absolute paths (each glob sorted); a missing file is a user error."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[str] = []
    for p in patterns:
        p = os.fspath(p)
        if glob.has_magic(p):
            hits = sorted(glob.glob(p))
            if not hits:
                raise UserError(f"no input file matches {p!r}; check the path or quote the glob.")
            out.extend(os.path.abspath(h) for h in hits)
        elif os.path.isdir(p):
            raise UserError(f"input {p} is a directory; pass the TSV files in it (a glob like '{p}/*.tsv').")
        elif not os.path.isfile(p):
            raise UserError(f"input file {p} does not exist; check the path.")
        else:
            out.append(os.path.abspath(p))
    return out


def build_sources(vl=None, text=None, image=None, detection=None, vl_parquet=None,
                  finetune: dict[str, Any] | None = None) -> list[Source]:
    sources: list[Source] = []
    for name, files in (("vl", vl), ("text", text), ("image", image), ("detection", detection)):
        inputs = [InputFile(p, "tsv") for p in _expand(files)]
        if name == "vl":
            inputs += [InputFile(p, "parquet") for p in _expand(vl_parquet)]
        if inputs:
            sources.append(Source(name, name, inputs))
    for fmt, files in (finetune or {}).items():
        get_format(fmt)
        if any(s.name == fmt for s in sources):
            raise UserError(f"source {fmt!r} was given twice; pass all its files to one option.")
        sources.append(Source(fmt, fmt, [InputFile(p, "tsv") for p in _expand(files)]))
    if not sources:
        raise UserError("no input given; pass at least one of --vl, --text, --image, --detection, --vl-parquet "
                        "or --format NAME --input FILE.")
    return sources


# ----------------------------------------------------------------------------------------------- progress counters
class _Counters:
    """rows and bytes read per source; shared across processes when converting in parallel."""

    def __init__(self, n: int, shared=None):
        self.values = shared if shared is not None else [0.0] * (2 * n)

    def add(self, i: int, rows: int, nbytes: int) -> None:
        lock = getattr(self.values, "get_lock", None)
        if lock is not None:
            with lock():
                self.values[2 * i] += rows
                self.values[2 * i + 1] += nbytes
        else:
            self.values[2 * i] += rows
            self.values[2 * i + 1] += nbytes

    def get(self, i: int) -> tuple[float, float]:
        return self.values[2 * i], self.values[2 * i + 1]


_COUNTERS: _Counters | None = None


def _init_worker(shared, n: int) -> None:
    global _COUNTERS
    _COUNTERS = _Counters(n, shared)


class _ProgressBar:
    """Per-source rows/s and MB/s on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, sources: list[Source], totals: dict[str, int], counters: _Counters, enabled: bool):
        self.sources, self.totals, self.counters, self.enabled = sources, totals, counters, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.finished: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def line(self) -> str:
        now = time.monotonic()
        parts = []
        for i, s in enumerate(self.sources):
            rows, nbytes = self.counters.get(i)
            total = self.totals.get(s.name, 0)
            if rows >= total and i not in self.finished:
                self.finished[i] = now  # a finished source's rates stop at its own end, not the run's
            dt = max(self.finished.get(i, now) - self.t0, 1e-9)
            pct = f" {100 * rows / total:5.1f}%" if total else ""
            parts.append(f"{s.name}: {int(rows)}/{total}{pct} {rows / dt:,.0f} rows/s {nbytes / dt / 1e6:,.1f} MB/s")
        return " | ".join(parts)

    def _loop(self) -> None:
        last_print = time.monotonic()
        while not self._stop.wait(0.5):  # sample often (finish times), print every 10 s off a terminal
            text = self.line()
            if self.tty:
                print("\r" + text, end="", file=sys.stderr, flush=True)
            elif time.monotonic() - last_print >= 10.0:
                print(text, file=sys.stderr, flush=True)
                last_print = time.monotonic()

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()
            print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- one row
def _clip_box(b: list[float], w: int, h: int) -> None:
    x0, y0, x1, y1 = b
    t = BOX_TOLERANCE_PX
    if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t or x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
        raise RowReject(BOX_OUTSIDE_IMAGE, f"{x0:g},{y0:g},{x1:g},{y1:g} vs image {w}x{h}")
    b[:] = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]


def _attach_image(meta: dict, data: bytes, fmt: RowFormat, task: ChunkTask) -> dict[str, bytes]:
    img = check_image(data, max_pixels=task.max_pixels,
                      downscale_shorter_side=task.downscale if fmt.downscalable else None)
    if fmt.image_size is not None and (img.orig_width, img.orig_height) != fmt.image_size:
        raise RowReject(WRONG_IMAGE_SIZE, f"{img.orig_width}x{img.orig_height}, must be "
                                          f"{fmt.image_size[0]}x{fmt.image_size[1]}")
    for b in iter_boxes(meta):
        _clip_box(b, img.orig_width, img.orig_height)
        if img.width != img.orig_width or img.height != img.orig_height:
            sx, sy = img.scale_x, img.scale_y
            b[:] = [round(b[0] * sx, 3), round(b[1] * sy, 3), round(b[2] * sx, 3), round(b[3] * sy, 3)]
    meta["image"] = img.meta()
    return {img.ext: img.data}


def _sample(meta: dict, members: dict[str, bytes]) -> dict[str, bytes]:
    out = {"json": json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")}
    out.update(members)
    return out


def convert_tsv_line(raw: bytes, fmt: RowFormat, line: int, task: ChunkTask) -> tuple[str, dict, dict[str, bytes]]:
    """(key, meta, members) for one TSV line, or RowReject."""
    if not raw.strip():
        raise RowReject(BLANK_LINE)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowReject(BAD_UTF8, f"invalid byte at position {e.start}") from None
    cols = text.split("\t")
    uniq_id, fields = fmt.parse(cols, line)
    meta = {"uniq_id": uniq_id, "source": task.source, "line": line, **fields}
    members = {}
    if fmt.image_column is not None:
        members = _attach_image(meta, decode_base64(cols[fmt.image_column]), fmt, task)
    if task.multi_file:
        meta["file"] = os.path.basename(task.path)
    return sample_key(task.key_line_offset + line, uniq_id), meta, _sample(meta, members)


def convert_parquet_row(key: str | None, data: bytes | None, caption: str | None, line: int, task: ChunkTask
                        ) -> tuple[str, dict, dict[str, bytes]]:
    uniq_id = key if key is not None else str(line)
    if caption is None or not caption.strip():
        raise RowReject(EMPTY_TEXT, "txt")
    if not data:
        raise RowReject(MISSING_IMAGE, "jpg column is empty")
    meta = {"uniq_id": uniq_id, "source": task.source, "line": line, "type": "caption", "caption": caption,
            "question": "", "answers": [], "box": None, "gt_objects": [], "dataset_name": "img2dataset",
            "file": os.path.basename(task.path)}
    members = _attach_image(meta, data, FORMATS["vl"], task)
    return sample_key(task.key_line_offset + line, uniq_id), meta, _sample(meta, members)


def _reject_id(raw: bytes, fmt: RowFormat) -> bytes:
    """The id column of a rejected line, undecoded (rejects_tsv bounds and decodes it)."""
    if fmt.id_column is None:
        return b""
    cols = raw.split(b"\t", fmt.id_column + 1)
    return cols[fmt.id_column] if len(cols) > fmt.id_column else b""


# ----------------------------------------------------------------------------------------------- one chunk
def _parts_dir(out: str, source: str) -> Path:
    return Path(out) / source / PARTS_DIR


def _chunk_prefix(chunk_id: int) -> str:
    return f"c{chunk_id:06d}"


class _ChunkStats:
    def __init__(self):
        self.reasons: collections.Counter = collections.Counter()
        self.types: collections.Counter = collections.Counter()
        self.widths: collections.Counter = collections.Counter()
        self.heights: collections.Counter = collections.Counter()
        self.formats: collections.Counter = collections.Counter()
        self.text_chars: collections.Counter = collections.Counter()
        self.downscaled = 0
        self.image_bytes = 0

    def add(self, meta: dict, members: dict[str, bytes]) -> None:
        if "type" in meta:
            self.types[meta["type"]] += 1
        if "image" in meta:
            im = meta["image"]
            self.widths[im["orig_width"]] += 1
            self.heights[im["orig_height"]] += 1
            self.formats[im["format"]] += 1
            self.downscaled += im["scale"] != 1.0
            self.image_bytes += len(members.get("jpg") or members.get("png") or b"")
        if "text" in meta:
            self.text_chars[len(meta["text"])] += 1

    def to_json(self) -> dict:
        return {"reasons": dict(self.reasons), "types": dict(self.types),
                "widths": {str(k): v for k, v in self.widths.items()},
                "heights": {str(k): v for k, v in self.heights.items()},
                "formats": dict(self.formats), "text_chars": {str(k): v for k, v in self.text_chars.items()},
                "downscaled": self.downscaled, "image_bytes": self.image_bytes}


def _iter_chunk_rows(task: ChunkTask, fmt: RowFormat) -> Iterator[tuple[int, int, Any]]:
    """(line number, bytes read, row) per line; row = raw bytes (tsv) or (key, image, caption) (parquet)."""
    if task.kind == "tsv":
        for i, (raw, n) in enumerate(tsv_chunks.iter_lines(task.path, task.start, task.end)):
            yield task.first_line + i, n, raw
    else:
        for i, (key, data, caption, n) in enumerate(parquet_input.iter_rows(task.path, task.start, task.end)):
            yield task.first_line + i, n, (key, data, caption)


def convert_chunk(task: ChunkTask) -> dict:
    """Convert one chunk into part shards, a rejects file and an index file under `<source>/.parts/`."""
    fmt = FORMATS[task.format] if task.kind == "tsv" else FORMATS["vl"]
    pdir = _parts_dir(task.out, task.source)
    pdir.mkdir(parents=True, exist_ok=True)
    prefix = _chunk_prefix(task.chunk_id)
    for pattern in (f"{prefix}[-.]*", f".{prefix}[-.]*"):  # leftovers of an interrupted attempt
        for stale in pdir.glob(pattern):
            stale.unlink()
    seq = ShardSequence(lambda i: pdir / f"{prefix}-{i:04d}.tar", task.shard_bytes)
    rejects_path = pdir / f"{prefix}.rejects.tsv"
    index_path = pdir / f"{prefix}.index.parquet"
    stats = _ChunkStats()
    rows = written = rejected = 0
    pending_rows = pending_bytes = 0
    index_tmp = index_path.with_name("." + index_path.name + ".tmp")
    rejects_tmp = rejects_path.with_name("." + rejects_path.name + ".tmp")
    counters = _COUNTERS
    try:
        with open(rejects_tmp, "w", encoding="utf-8", newline="\n") as rej, \
                shard_index.PartIndexWriter(index_tmp) as index_writer:
            for line, nbytes, row in _iter_chunk_rows(task, fmt):
                rows += 1
                try:
                    if task.kind == "tsv":
                        key, meta, members = convert_tsv_line(row, fmt, line, task)
                    else:
                        key, meta, members = convert_parquet_row(*row, line, task)
                except RowReject as e:
                    rejected += 1
                    stats.reasons[e.code] += 1
                    if task.kind == "tsv":
                        uid, shown = _reject_id(row, fmt), row
                    else:
                        uid = row[0] or ""
                        shown = f"key={row[0]} txt={row[2]}"
                    rej.write(rejects_tsv.line(task.source, line, uid, e.reason, shown))
                else:
                    part = seq.add(key, members)
                    written += 1
                    stats.add(meta, members)
                    im = meta.get("image") or {}
                    index_writer.add(key, meta["uniq_id"], part, line, im.get("width"), im.get("height"),
                                     sum(len(v) for v in members.values()))
                pending_rows += 1
                pending_bytes += nbytes
                if pending_rows >= 64 and counters is not None:
                    counters.add(task.source_index, pending_rows, pending_bytes)
                    pending_rows = pending_bytes = 0
        parts = seq.close()
    except BaseException:
        seq.abort()
        for tmp in (rejects_tmp, index_tmp):  # free their space now (disk full), not at the next attempt
            tmp.unlink(missing_ok=True)
        raise
    if counters is not None:
        counters.add(task.source_index, pending_rows, pending_bytes)
    os.replace(rejects_tmp, rejects_path)
    os.replace(index_tmp, index_path)
    rel = lambda p: os.path.relpath(p, task.out)  # noqa: E731
    return {
        "source": task.source, "chunk_id": task.chunk_id, "rows_read": rows, "samples_written": written, "rejected": rejected,
        "parts": [{"part": rel(p.path), "final": None, "samples": p.samples, "bytes": p.bytes, "sha256": p.sha256}
                  for p in parts],
        "rejects": {"path": rel(rejects_path), "sha256": file_sha256(rejects_path)},
        "index": {"path": rel(index_path), "sha256": file_sha256(index_path)},
        "stats": stats.to_json(),
    }


def _pool_context():
    """Workers come from a fork server that has imported this module once, else are spawned.

    A spawned worker starts a fresh interpreter and re-imports the converter (pyarrow, numpy, PIL): 0.2-0.5 s of
    CPU per worker before it converts anything, which on 2 cores cancelled the second worker's gain on a 61 MB
    input. Plain fork would avoid it but copies whatever threads and locks the caller holds: a caller that has
    used pyarrow (its thread pools) or runs threads can deadlock a forked worker. The fork server is a fresh,
    single-threaded process; it pays the import once and forks each worker ready to run. Same bytes either way.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # no effect if this process already runs a fork server
        return ctx
    return multiprocessing.get_context("spawn")


def _count_task(args: tuple[str, str, int, int]) -> int:
    kind, path, start, end = args
    if kind == "tsv":
        return tsv_chunks.count_lines(path, start, end)
    return parquet_input.count_rows(path, start, end)


# ----------------------------------------------------------------------------------------------- output dir state
def _file_id(path: str) -> dict:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fingerprint(sources: list[Source], negatives: str | None, options: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "sources": {s.name: {"format": s.format, "inputs": [{"kind": i.kind, **_file_id(i.path)} for i in s.inputs]}
                    for s in sources},
        "negatives": None if negatives is None else [_file_id(os.path.join(negatives, n)) for n in NEGATIVE_FILES],
        "options": options,
    }


def _prepare_out(out: Path, fingerprint: dict, resume: bool) -> dict | None:
    """Check the output directory; return the progress to resume from (None = start fresh)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output directory {out} ({e.strerror or e}); choose a writable --out.")
    progress_path = out / PROGRESS_FILE
    manifest_path = out / "manifest.json"
    prior = None
    for p in (progress_path, manifest_path):
        if p.exists():
            try:
                prior = json.loads(p.read_text())
            except (OSError, ValueError):
                raise UserError(f"{p} is unreadable; delete {out} or choose a new --out.") from None
            break
    if prior is None:
        if any(out.iterdir()):
            raise UserError(f"output directory {out} is not empty and holds no conversion; choose an empty or "
                            f"new --out.")
        return None
    if prior.get("fingerprint") != fingerprint:
        raise UserError(f"output directory {out} holds a different conversion (other inputs or options); choose "
                        f"a new --out or delete it.")
    if not resume:
        state = "a finished" if manifest_path.exists() else "an interrupted"
        raise UserError(f"output directory {out} already holds {state} conversion of these inputs; pass --resume "
                        f"to continue/verify it or choose a new --out.")
    return json.loads(progress_path.read_text()) if progress_path.exists() else None


def _verify(out: Path, entry: dict) -> bool:
    """Is this file (at its final name if renamed, else its part name) present with its recorded hash?"""
    for key in ("final", "part", "path"):
        rel = entry.get(key)
        if rel and (out / rel).is_file() and file_sha256(out / rel) == entry["sha256"]:
            entry["at"] = rel
            return True
    return False


def _verified_chunk(out: Path, result: dict | None) -> bool:
    if not result:
        return False
    return all(_verify(out, p) for p in result["parts"]) and _verify(out, result["rejects"]) \
        and _verify(out, result["index"])


# ----------------------------------------------------------------------------------------------- finalise
def _percentiles(counts: dict[str, int]) -> dict | None:
    items = sorted((int(k), v) for k, v in counts.items())
    total = sum(v for _, v in items)
    if not total:
        return None
    out, acc, qs = {}, 0, [("min", 0.0), ("p5", 0.05), ("p50", 0.5), ("p95", 0.95)]
    qi = 0
    for value, n in items:
        acc += n
        while qi < len(qs) and acc > qs[qi][1] * total:
            out[qs[qi][0]] = value
            qi += 1
    out["max"] = items[-1][0]
    return out


def _merge_stats(results: list[dict]) -> dict:
    merged: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    downscaled = image_bytes = 0
    for r in results:
        for k in ("reasons", "types", "widths", "heights", "formats", "text_chars"):
            merged[k].update(r["stats"][k])
        downscaled += r["stats"]["downscaled"]
        image_bytes += r["stats"]["image_bytes"]
    stats: dict[str, Any] = {"rejects_by_reason": dict(sorted(merged["reasons"].items()))}
    if merged["types"]:
        stats["types"] = dict(sorted(merged["types"].items()))
    if merged["widths"]:
        n = sum(merged["formats"].values())
        stats.update({"orig_width": _percentiles(merged["widths"]), "orig_height": _percentiles(merged["heights"]),
                      "image_formats": dict(sorted(merged["formats"].items())), "downscaled": downscaled,
                      "image_bytes_mean": round(image_bytes / n, 1) if n else 0})
    if merged["text_chars"]:
        stats["text_chars"] = _percentiles(merged["text_chars"])
    return stats


def _finalise_source(out: Path, source: Source, results: list[dict], progress: dict, progress_path: Path) -> dict:
    """Rename parts to `<source>-%06d.tar` in chunk order, write index.parquet; return the manifest entry."""
    results = sorted(results, key=lambda r: r["chunk_id"])
    shards, n = [], 0
    for r in results:
        for p in r["parts"]:
            p["final"] = f"{source.name}/{source.name}-{n:06d}.tar"
            n += 1
    atomic_write_json(progress_path, progress)  # record final names before moving anything
    for r in results:
        for p in r["parts"]:
            final = out / p["final"]
            if p.get("at") != p["final"]:
                os.replace(out / p["part"], final)
                p["at"] = p["final"]
            shards.append({"path": p["final"], "samples": p["samples"], "bytes": p["bytes"], "sha256": p["sha256"]})
    # A source whose inputs are all empty has no chunks: it still gets its directory and an empty index.
    (out / source.name).mkdir(parents=True, exist_ok=True)
    shard_index.merge_parts(out / source.name / "index.parquet",
                            [(out / r["index"]["path"], [p["final"] for p in r["parts"]]) for r in results])
    return {
        "format": source.format,
        "inputs": [i.path for i in source.inputs],
        "rows_read": sum(r["rows_read"] for r in results),
        "samples_written": sum(r["samples_written"] for r in results),
        "rejected": sum(r["rejected"] for r in results),
        "inputs_empty": not results,  # every input file of this source is empty: no chunk, no shard, no row
        "shards": shards,
        "index": f"{source.name}/index.parquet",
        "stats": _merge_stats(results),
    }


def _write_rejects(out: Path, sources: list[Source], results: dict[str, list[dict]]) -> None:
    tmp = out / ".rejects.tsv.tmp"
    with open(tmp, "wb") as f:
        f.write(rejects_tsv.HEADER.encode())
        for s in sources:
            for r in sorted(results[s.name], key=lambda r: r["chunk_id"]):
                with open(out / r["rejects"]["path"], "rb") as part:
                    shutil.copyfileobj(part, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "rejects.tsv")


def _copy_negatives(out: Path, negatives: str) -> dict:
    files = {}
    for name in NEGATIVE_FILES:
        data = (Path(negatives) / name).read_bytes()
        atomic_write_bytes(out / "negatives" / name, data)
        files[name] = {"path": f"negatives/{name}", "bytes": len(data)}
    return files


def _check_negatives(negatives: str | None) -> str | None:
    """Validate the negative-sample dir up front, so a bad one fails before hours of conversion."""
    if negatives is None:
        return None
    missing = [n for n in NEGATIVE_FILES if not (Path(negatives) / n).is_file()]
    if missing:
        raise UserError(f"negative-sample directory {negatives} lacks {', '.join(missing)}; it must hold "
                        f"{', '.join(NEGATIVE_FILES)}.")
    try:
        t2a = json.loads((Path(negatives) / "type2ans.json").read_bytes())
    except ValueError:
        raise UserError(f"{negatives}/type2ans.json is not valid JSON; fix or regenerate it.") from None
    if not isinstance(t2a, dict) or "other" not in t2a:
        raise UserError(f"{negatives}/type2ans.json must be an object with an \"other\" key (spec §1.5).")
    return os.path.abspath(negatives)


# ----------------------------------------------------------------------------------------------- disk full
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _remove_temporaries(out: Path, sources: list[Source]) -> None:
    """Delete the unfinished files of this run (all named `.*.tmp`), so a full disk gets its space back now.
    Nothing a reader uses is touched: shards, indexes, rejects.tsv and manifest.json only ever appear by rename."""
    dirs = [out, out / "negatives"] + [out / s.name for s in sources] + [_parts_dir(str(out), s.name)
                                                                         for s in sources]
    for d in dirs:
        for tmp in d.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _disk_full_is_a_user_error(out: Path, sources: list[Source]):
    """A full disk (in this process or a worker) ends in one sentence. Every output file is written under a
    temporary name and renamed when complete, so what was published before (finished chunks, a previous
    manifest) is intact, and --resume continues from the finished chunks."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        _remove_temporaries(out, sources)
        free = shutil.disk_usage(out).free / 2**20
        where = f" writing {e.filename}" if e.filename else ""
        raise UserError(f"the disk of {out} is full ({os.strerror(e.errno).lower()}{where}; {free:.0f} MiB free "
                        f"after removing this run's unfinished files); free space or choose another --out, then "
                        f"re-run with --resume to keep the finished chunks.") from None


# ----------------------------------------------------------------------------------------------- entry point
def convert(out: str | os.PathLike, *, vl=None, text=None, image=None, detection=None, negatives=None,
            vl_parquet=None, finetune: dict[str, Any] | None = None, workers: int = 1,
            shard_size_mb: float = DEFAULT_SHARD_MB, downscale_shorter_side: int | None = None,
            resume: bool = False, chunk_mb: float = DEFAULT_CHUNK_MB, max_image_pixels: int = DEFAULT_MAX_PIXELS,
            progress: bool = False, command: str | None = None) -> dict:
    """Convert OFA TSVs (any subset of sources; paths or globs) to shards under `out`; return the manifest.

    `finetune` maps a format name of `tsv_formats.FORMATS` (caption, vqa, refcoco, …) to its files; each becomes
    a source of that name. Raises UserError (and writes no manifest) for missing inputs or an unusable `out`."""
    global _COUNTERS  # the in-process worker reports progress through the same counters as pool workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers}).")
    if shard_size_mb <= 0 or chunk_mb <= 0:
        raise UserError("--shard-size-mb and --chunk-mb must be positive.")
    if downscale_shorter_side is not None and downscale_shorter_side < 1:
        raise UserError(f"--downscale-shorter-side must be a positive pixel count (got {downscale_shorter_side}).")
    sources = build_sources(vl, text, image, detection, vl_parquet, finetune)
    negatives = _check_negatives(None if negatives is None else os.fspath(negatives))
    out = Path(out).resolve()
    options = {"shard_bytes": int(shard_size_mb * 2**20), "chunk_bytes": int(chunk_mb * 2**20),
               "downscale_shorter_side": downscale_shorter_side, "max_image_pixels": max_image_pixels}
    fingerprint = _fingerprint(sources, negatives, options)
    prior = _prepare_out(out, fingerprint, resume)
    with _disk_full_is_a_user_error(out, sources):
        progress_path = out / PROGRESS_FILE
        progress = bool(progress)

        # Plan chunks (boundaries depend on the files and chunk size only) and count their lines.
        plan: list[tuple[Source, int, InputFile, int, int]] = []
        for si, s in enumerate(sources):
            for inp in s.inputs:
                ranges = (tsv_chunks.plan_ranges(inp.path, options["chunk_bytes"]) if inp.kind == "tsv" else
                          [(a, b) for a, b, _ in parquet_input.plan_row_groups(inp.path, options["chunk_bytes"])])
                plan.extend((s, si, inp, a, b) for a, b in ranges)
        old_chunks = (prior or {}).get("chunks", [])
        if [c["range"] for c in old_chunks] == [[s.name, inp.path, a, b] for s, _, inp, a, b in plan]:
            line_counts = [c["lines"] for c in old_chunks]
        else:
            old_chunks, line_counts = [], None

        ctx = _pool_context()
        shared = ctx.Array("d", 2 * len(sources)) if workers > 1 else None
        counters = _Counters(len(sources), shared)
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(shared, len(sources))) if workers > 1 else None
        try:
            count_args = [(inp.kind, inp.path, a, b) for _, _, inp, a, b in plan]
            if line_counts is None:
                line_counts = pool.map(_count_task, count_args) if pool else [_count_task(a) for a in count_args]
            tasks: list[ChunkTask] = []
            chunks_state: list[dict] = []
            per_source_id: dict[str, int] = collections.Counter()
            file_line: dict[tuple[str, str], int] = collections.Counter()
            source_lines: dict[str, int] = collections.Counter()
            file_offset: dict[tuple[str, str], int] = {}
            for (s, si, inp, a, b), n in zip(plan, line_counts):
                if (s.name, inp.path) not in file_offset:
                    file_offset[(s.name, inp.path)] = source_lines[s.name]
                cid = per_source_id[s.name]
                per_source_id[s.name] += 1
                tasks.append(ChunkTask(s.name, si, s.format, inp.kind, inp.path, a, b, cid,
                                       file_line[(s.name, inp.path)] + 1, file_offset[(s.name, inp.path)],
                                       len(s.inputs) > 1, str(out),
                                       options["shard_bytes"], downscale_shorter_side, max_image_pixels))
                file_line[(s.name, inp.path)] += n
                source_lines[s.name] += n
                old = old_chunks[len(chunks_state)] if old_chunks else {}
                chunks_state.append({"range": [s.name, inp.path, a, b], "lines": n, "result": old.get("result")})
            state = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "chunks": chunks_state}
            todo_ids = [i for i, c in enumerate(chunks_state) if not _verified_chunk(out, c["result"])]
            for i in todo_ids:
                chunks_state[i]["result"] = None
            # Largest chunks first, so that the last chunk to finish is a small one and no worker idles long at the
            # end (results are placed by chunk id, so the order of work never changes the output).
            todo = sorted((tasks[i] for i in todo_ids), key=lambda t: t.start - t.end)
            atomic_write_json(progress_path, state)

            _COUNTERS = counters
            # Totals cover only the chunks still to do, so percentages and rates describe this run's work.
            todo_lines: dict[str, int] = collections.Counter()
            for i in todo_ids:
                todo_lines[tasks[i].source] += chunks_state[i]["lines"]
            with _ProgressBar(sources, dict(todo_lines), counters, progress):
                position = {(t.source, t.chunk_id): i for i, t in enumerate(tasks)}
                results = pool.imap_unordered(convert_chunk, todo) if pool else map(convert_chunk, todo)
                for res in results:
                    chunks_state[position[(res["source"], res["chunk_id"])]]["result"] = res
                    atomic_write_json(progress_path, state)
        finally:
            _COUNTERS = None
            if pool is not None:
                pool.terminate()
                pool.join()

        by_source: dict[str, list[dict]] = {s.name: [] for s in sources}
        for t, c in zip(tasks, chunks_state):
            by_source[t.source].append(c["result"])
        manifest_sources = {s.name: _finalise_source(out, s, by_source[s.name], state, progress_path) for s in sources}
        atomic_write_json(progress_path, state)
        _write_rejects(out, sources, by_source)
        manifest = {
            "format_version": FORMAT_VERSION,
            "command": command or "ofa_scale.data.convert.convert()",
            "tool_version": ofa_scale.__version__,
            "sources": manifest_sources,
            "negatives": _copy_negatives(out, negatives) if negatives else None,
            "rejects": "rejects.tsv",
            "options": options,
            "fingerprint": fingerprint,
        }
        atomic_write_json(out / "manifest.json", manifest)
        return manifest


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    files = dict(nargs="+", action="extend", metavar="TSV")
    parser.add_argument("--vl", **files, help="vision_language_examples TSV(s) or globs")
    parser.add_argument("--text", **files, help="text_examples TSV(s) or globs")
    parser.add_argument("--image", **files, help="image_examples TSV(s) or globs (256x256 images + 256 codes)")
    parser.add_argument("--detection", **files, help="detection_examples TSV(s) or globs")
    parser.add_argument("--vl-parquet", nargs="+", action="extend", metavar="PARQUET",
                        help="img2dataset Parquet (key, jpg, txt) converted to vl caption rows")
    parser.add_argument("--format", choices=sorted(set(FORMATS) - set(PRETRAIN_SOURCES)),
                        help="fine-tuning TSV format of --input (spec §7)")
    parser.add_argument("--input", nargs="+", action="extend", metavar="TSV", help="files in --format")
    parser.add_argument("--negatives", metavar="DIR", help="negative_sample dir (all_captions.txt, object.txt, "
                                                           "type2ans.json), copied to OUT/negatives/")
    parser.add_argument("--out", required=True, help="output directory (new or empty, or one to --resume)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes; output is identical for any N")
    parser.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_MB, help="target shard size")
    parser.add_argument("--downscale-shorter-side", type=int, metavar="PX",
                        help="shrink images whose shorter side exceeds PX (boxes rescaled); never upscales")
    parser.add_argument("--resume", action="store_true", help="keep verified finished chunks, redo the rest")
    parser.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_MB,
                        help="input bytes per unit of parallel work (changing it changes shard boundaries)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="reject images whose header claims more pixels (decompression bombs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    if (args.format is None) != (args.input is None):
        raise UserError("--format and --input go together: --format NAME --input FILE.")
    manifest = convert(
        args.out, vl=args.vl, text=args.text, image=args.image, detection=args.detection,
        negatives=args.negatives, vl_parquet=args.vl_parquet,
        finetune={args.format: args.input} if args.format else None, workers=args.workers,
        shard_size_mb=args.shard_size_mb, downscale_shorter_side=args.downscale_shorter_side, resume=args.resume,
        chunk_mb=args.chunk_mb, max_image_pixels=args.max_image_pixels,
        progress=not args.no_progress,
        command="ofa-preprocess shards " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    for name, s in manifest["sources"].items():
        print(f"{name}: {s['rows_read']} rows read, {s['samples_written']} written, {s['rejected']} rejected, "
              f"{len(s['shards'])} shards")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


__all__ = ["convert", "convert_chunk", "ChunkTask", "add_arguments", "run", "FORMAT_VERSION"]

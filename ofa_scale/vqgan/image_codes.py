"""`ofa-preprocess image-codes`: VQGAN codes for a folder of images or an OFA code-generation TSV.

Modes (spec §1.3, §7.6, §10.5.4):
* `examples` → image_examples.tsv rows `image_id, base64 256×256 image, 256 codes`: the image is resized (shorter
  side 256, LANCZOS) and centre-cropped to 256×256 (kept byte for byte when it already is 256×256 JPEG/PNG, else
  stored as JPEG q95), and the codes are those of the central 128×128 of the *stored* image, so they can be
  recomputed from the row exactly.
* `image_gen` → text-to-image rows `uniq_id, 1024 codes, caption` of the 256×256 centre crop.

Like `ofa-preprocess shards`, every input row is either written or rejected with a reason (OUT.rejects.tsv), and
the run is resumable: rows are appended to a hidden partial file and, after each batch, OUT.progress.json records
the input position and the partial file's size and sha256. `--resume` verifies that prefix, drops anything written
after it and continues; the output is the same bytes as an uninterrupted run. OUT appears (by rename) only when
complete, followed by OUT.manifest.json with the counts.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import io
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import ofa_scale
from ofa_scale.data import rejects_tsv
from ofa_scale.data.image_check import DEFAULT_MAX_PIXELS, check_image
from ofa_scale.data.tsv_formats import EMPTY_TEXT, NOT_AN_IMAGE, RowReject
from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_json
from ofa_scale.vqgan.images import INFILL_IMAGE_SIZE as IMAGE_SIZE
from ofa_scale.vqgan.images import centre_pixels, flat_seeds, square_image
from ofa_scale.vqgan.inputs import Row, open_input

FORMAT_VERSION = 1
MODES = ("examples", "image_gen")
BAD_ID = "bad_id"


# ----------------------------------------------------------------------------------------------- one row
def prepare(row: Row, mode: str, max_pixels: int) -> tuple[np.ndarray, str | None]:
    """(pixels to encode, base64 image to store or None) for an accepted row; RowReject otherwise."""
    if row.reject is not None:
        raise row.reject
    if any(c in row.uid for c in "\t\r\n"):
        raise RowReject(BAD_ID, "the id holds a tab or line break")
    if mode == "image_gen" and not (row.caption or "").strip():
        raise RowReject(EMPTY_TEXT, "image_gen rows need a caption (a 4-column TSV, or NAME.txt beside the image)")
    stored = check_image(row.data, max_pixels=max_pixels)
    try:
        img = Image.open(io.BytesIO(stored.data))
        if mode == "image_gen":
            return np.asarray(square_image(img, IMAGE_SIZE)), None
        data = stored.data
        if (stored.width, stored.height) != (IMAGE_SIZE, IMAGE_SIZE):
            buf = io.BytesIO()
            square_image(img, IMAGE_SIZE).save(buf, format="JPEG", quality=95)
            data = buf.getvalue()
        return centre_pixels(Image.open(io.BytesIO(data))), base64.urlsafe_b64encode(data).decode("ascii")
    except (OSError, ValueError) as e:  # a mode PIL cannot turn into RGB (e.g. some 16-bit or CMYK variants)
        raise RowReject(NOT_AN_IMAGE, f"cannot convert to RGB ({str(e)[:60]})") from None


def output_line(mode: str, row: Row, codes: np.ndarray, b64: str | None) -> str:
    text = " ".join(map(str, codes.reshape(-1).tolist()))
    if mode == "examples":
        return f"{row.uid}\t{b64}\t{text}\n"
    return f"{row.uid}\t{text}\t{' '.join(row.caption.split())}\n"


def centre_code_fn(vqgan_dir: str | os.PathLike, device: str | None = "cpu"):
    """`f(256×256 PIL image) -> 256 codes` of its central 128×128 with the VQGAN of `vqgan_dir` (what
    image_examples rows carry; used by the sample corpus' `--vqgan`)."""
    from ofa_scale.vqgan.checkpoint import load_vqgan

    model = load_vqgan(vqgan_dir, device=device)
    return lambda img: model.encode(centre_pixels(img)[None]).reshape(-1).tolist()


# ----------------------------------------------------------------------------------------------- output state
class _Output:
    """The partial output + rejects files and the progress record that makes them resumable."""

    def __init__(self, out: Path, fingerprint: dict, resume: bool):
        self.out = out
        self.partial = out.with_name(f".{out.name}.partial")
        self.rejects = out.with_name(out.name + ".rejects.tsv")
        self.progress = out.with_name(out.name + ".progress.json")
        self.manifest = out.with_name(out.name + ".manifest.json")
        self.state = self._start(fingerprint, resume)
        done = self.state["complete"]
        self.out_hash = self._verified_prefix(self.out if done else self.partial, self.state["out"])
        self.rej_hash = self._verified_prefix(self.rejects, self.state["rejects"])
        self.out_f = None if done else open(self.partial, "ab")
        self.rej_f = None if done else open(self.rejects, "ab")

    def _start(self, fingerprint: dict, resume: bool) -> dict:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder of --out {self.out} ({e.strerror or e})") from None
        if self.progress.exists():
            try:
                state = json.loads(self.progress.read_text())
            except (OSError, ValueError):
                raise UserError(f"{self.progress} is unreadable; delete it and {self.out} and start again") from None
            if state.get("fingerprint") != fingerprint:
                raise UserError(f"{self.out} belongs to a run with other inputs or options; choose a new --out or "
                                f"delete {self.out}* ")
            if not resume:
                what = "a finished" if state.get("complete") else "an interrupted"
                raise UserError(f"{self.out} is {what} run of these inputs; pass --resume to continue/verify it or "
                                f"choose a new --out")
            return state
        if self.out.exists() or self.partial.exists():
            raise UserError(f"--out {self.out} already exists and holds no image-codes run; choose a new --out")
        self.rejects.write_text(rejects_tsv.HEADER)
        self.partial.write_bytes(b"")
        rej = self.rejects.read_bytes()
        state = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "complete": False,
                 "position": 0, "rows_read": 0, "samples_written": 0, "rejected": 0, "rejects_by_reason": {},
                 "out": {"bytes": 0, "sha256": hashlib.sha256().hexdigest()},
                 "rejects": {"bytes": len(rej), "sha256": hashlib.sha256(rej).hexdigest()}}
        atomic_write_json(self.progress, state)  # from now on a rerun knows these files are this run's
        return state

    def _verified_prefix(self, path: Path, rec: dict):
        """sha256 of the recorded prefix of `path`, checked; what follows it (an unrecorded batch) is dropped."""
        h = hashlib.sha256()
        try:
            with open(path, "rb+") as f:
                left = rec["bytes"]
                while left > 0 and (chunk := f.read(min(1 << 20, left))):
                    h.update(chunk)
                    left -= len(chunk)
                if left == 0 and h.hexdigest() == rec["sha256"]:
                    f.truncate(rec["bytes"])
                    return h
        except OSError:
            pass
        raise UserError(f"{path} no longer matches {self.progress} (changed or deleted since the interrupted run); "
                        f"delete {self.out}* and start again")

    def add(self, lines: list[str], rejects: list[str], rows: int, position: int,
            reasons: collections.Counter) -> None:
        """Append one batch, make it durable, then record it (so progress never runs ahead of the files)."""
        out_b = "".join(lines).encode("utf-8")
        rej_b = "".join(rejects).encode("utf-8")
        for f, data, h in ((self.out_f, out_b, self.out_hash), (self.rej_f, rej_b, self.rej_hash)):
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            h.update(data)
        s = self.state
        s["position"] = position
        s["rows_read"] += rows
        s["samples_written"] += len(lines)
        s["rejected"] += len(rejects)
        for code, n in reasons.items():
            s["rejects_by_reason"][code] = s["rejects_by_reason"].get(code, 0) + n
        s["out"] = {"bytes": s["out"]["bytes"] + len(out_b), "sha256": self.out_hash.hexdigest()}
        s["rejects"] = {"bytes": s["rejects"]["bytes"] + len(rej_b), "sha256": self.rej_hash.hexdigest()}
        atomic_write_json(self.progress, s)

    def finish(self, manifest: dict) -> dict:
        self.close()
        if not self.state["complete"]:
            os.replace(self.partial, self.out)
            self.state["complete"] = True
            atomic_write_json(self.progress, self.state)
        manifest.update({k: self.state[k] for k in ("rows_read", "samples_written", "rejected", "rejects_by_reason")})
        manifest.update({"output": str(self.out), "sha256": self.state["out"]["sha256"],
                         "rejects": str(self.rejects)})
        atomic_write_json(self.manifest, manifest)
        return manifest

    def close(self) -> None:
        for f in (self.out_f, self.rej_f):
            if f is not None:
                f.close()


# ----------------------------------------------------------------------------------------------- entry point
def write_image_codes(model, vqgan_dir: str | os.PathLike, input_path: str | os.PathLike, out: str | os.PathLike, *,
                      mode: str = "examples", batch_size: int = 32, sample: bool = False, seed: int = 0,
                      resume: bool = False, progress: bool = False, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                      command: str | None = None) -> dict:
    """Encode every row of `input_path` with `model` (a loaded VQGAN) into `out`; return the manifest."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    source = open_input(input_path)
    vq = Path(vqgan_dir).resolve()
    ckpt = (vq / "last.ckpt").stat()
    fingerprint = {"format_version": FORMAT_VERSION, "input": source.fingerprint(), "mode": mode,
                   "vqgan": {"dir": str(vq), "ckpt_size": ckpt.st_size, "ckpt_mtime_ns": ckpt.st_mtime_ns},
                   "sample": bool(sample), "seed": int(seed) if sample else None, "max_image_pixels": max_image_pixels}
    state = _Output(Path(out).resolve(), fingerprint, resume)
    src_name = Path(input_path).name
    try:
        if not state.state["complete"]:
            from tqdm import tqdm

            total = source.total()
            with tqdm(total=total, initial=state.state["rows_read"], unit="img", disable=not progress,
                      desc="image-codes", file=sys.stderr) as bar:
                rows = source.rows(state.state["position"], state.state["rows_read"])
                while True:
                    batch = [r for _, r in zip(range(batch_size), rows)]
                    if not batch:
                        break
                    _encode_batch(model, batch, state, mode, sample, seed, max_image_pixels, src_name)
                    bar.update(len(batch))
    except BaseException:
        state.close()
        raise
    return state.finish({"format_version": FORMAT_VERSION, "tool_version": ofa_scale.__version__,
                         "command": command or "ofa_scale.vqgan.image_codes.write_image_codes()",
                         "mode": mode, "input": str(Path(input_path).resolve()), "vqgan": str(vq),
                         "codes": "sampled (Gumbel, seeded)" if sample else "argmax",
                         "codes_per_row": 256 if mode == "examples" else 1024, "fingerprint": fingerprint})


def _encode_batch(model, batch: list[Row], state: _Output, mode: str, sample: bool, seed: int, max_pixels: int,
                  src_name: str) -> None:
    ok: list[tuple[Row, np.ndarray, str | None]] = []
    rejects: list[str] = []
    reasons: collections.Counter = collections.Counter()
    for row in batch:
        try:
            pixels, b64 = prepare(row, mode, max_pixels)
        except RowReject as e:
            reasons[e.code] += 1
            rejects.append(rejects_tsv.line(src_name, row.number, row.uid, e.reason, row.shown))
        else:
            ok.append((row, pixels, b64))
    lines = []
    if ok:
        codes = model.encode(np.stack([p for _, p, _ in ok]), sample=sample,
                             seeds=flat_seeds(seed, [r.number for r, _, _ in ok])).numpy()
        lines = [output_line(mode, r, c, b64) for (r, _, b64), c in zip(ok, codes)]
    state.add(lines, rejects, len(batch), batch[-1].end, reasons)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vqgan", required=True, metavar="DIR", help="folder with the taming model.yaml + last.ckpt")
    parser.add_argument("--input", required=True, metavar="IMAGES_OR_TSV",
                        help="a folder of images, or a TSV of (image-id, image-base64) or "
                             "(uniq-id, image-id, image-base64, text) rows")
    parser.add_argument("--out", required=True, metavar="TSV", help="output TSV (side files OUT.rejects.tsv, "
                                                                    "OUT.progress.json, OUT.manifest.json)")
    parser.add_argument("--mode", choices=MODES, default="examples",
                        help="examples: image_examples rows (256x256 image + 256 centre codes); image_gen: "
                             "uniq_id, 1024 codes, caption")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VQGAN forward")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, …")
    parser.add_argument("--sample-codes", action="store_true",
                        help="OFA's Gumbel-sampled codes (generate_code.py) instead of the deterministic argmax")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample-codes (per row, batch-independent)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="reject images whose header claims more pixels (decompression bombs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from ofa_scale.vqgan.checkpoint import load_vqgan

    model = load_vqgan(args.vqgan, device=args.device)
    m = write_image_codes(model, args.vqgan, args.input, args.out, mode=args.mode, batch_size=args.batch_size,
                          sample=args.sample_codes, seed=args.seed, resume=args.resume,
                          progress=not args.no_progress, max_image_pixels=args.max_image_pixels,
                          command="ofa-preprocess image-codes " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["rejects_by_reason"].items()))
    print(f"{m['rows_read']} rows read, {m['samples_written']} written, {m['rejected']} rejected"
          + (f" ({reasons})" if reasons else "") + f" on {model.device}")
    print(f"output: {m['output']}\nrejects: {m['rejects']}")
    return 0


__all__ = ["write_image_codes", "prepare", "centre_code_fn", "add_arguments", "run", "MODES"]

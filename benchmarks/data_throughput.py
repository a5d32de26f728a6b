"""Data throughput: OFA's TSV path vs the shard loader, per CPU core, on real photographs.

Prints one table measured side by side in one run (every repeat runs every path, in turn):
  (a) OFA-style TSV path: read line, base64-decode, PIL-decode the full image, random resize (shorter side
      384..480, sides <= 672, bicubic) + centre crop 384, float normalise;
  (b) shard path (ShardLoader, one process) over shards from a default conversion: decode, the same random
      resize + centre crop (torch's uint8 antialiased bicubic, cropped) to a uint8 tensor (normalisation is the
      device's job); also with JPEG draft decoding (decode_min_size 480);
  (c) shard path over shards converted with --downscale-shorter-side 480 (also with Pillow's crop-before-resize,
      for comparison);
  (d) bare decode of the stored image bytes (the floor of any path that decodes);
and a second table for `ofa-preprocess shards` (the rows repeated --convert-copies times): 1 and 2 workers, in wall
MB/s and in MB per CPU-second of all its processes, against a decode-and-write floor measured in the same run
(one process: split the line, base64-decode, validate the image as the converter does, write the bytes to a
file; no JSON, tar, index or rejects). Repeats are interleaved (1, 2, floor, 1, 2, floor, ...) so that a change in
the machine's load hits every row alike; the load average before and after is printed with the table.

Images: scikit-image's bundled photographs, centre-cropped to 4:3 and re-encoded as JPEG q90 in equal parts at
640x480, 1024x768 and 2048x1536. Everything runs in this process with torch limited to one thread, so samples/s is
per core (timed in CPU seconds of the process, so other jobs on the machine do not skew it); conversion is timed
in wall seconds (its 2-worker run uses two processes). Medians over repeats; ratios vs (a).

    python benchmarks/data_throughput.py            # full table (a few minutes)
    python benchmarks/data_throughput.py --quick    # small set, < 2 minutes
    python benchmarks/data_throughput.py --quick --convert-only --convert-copies 40   # conversion table only
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ofa_scale.data.image_check import check_image, decode_base64
from ofa_scale.data.image_ops import (
    OFA_CROP,
    OFA_MAX_SIDE,
    OFA_SHORTER_CHOICES,
    center_crop_offsets,
    ofa_resize_size,
    random_resize_center_crop,
    random_resize_center_crop_tensor,
    to_uint8_tensor,
)
from ofa_scale.data.loader import ShardLoader
from ofa_scale.data.loader_config import LoaderConfig
from ofa_scale.data.stream_reader import iter_shard_samples

SIZES = [(640, 480), (1024, 768), (2048, 1536)]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "cat"]
BATCH = 8


def load_photos() -> list[Image.Image]:
    from skimage import data as skdata

    photos = []
    for name in PHOTOS:
        try:
            arr = getattr(skdata, name)()
        except Exception:  # a photo that is not bundled with this scikit-image version (would need a download)
            continue
        img = Image.fromarray(arr).convert("RGB")
        # Centre-crop to 4:3 so the resize to the web sizes below keeps the photo undistorted.
        w, h = img.size
        if w * 3 > h * 4:
            nw = h * 4 // 3
            img = img.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
        else:
            nh = w * 3 // 4
            img = img.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
        photos.append(img)
    if not photos:
        raise SystemExit("no scikit-image photographs available offline")
    return photos


def make_jpegs(count: int) -> list[bytes]:
    """`count` JPEG q90 photos, equal parts of the three sizes."""
    photos = load_photos()
    out = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        img = photos[(i // len(SIZES)) % len(photos)].resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_vl_tsv(path: Path, jpegs: list[bytes]) -> None:
    """OFA vision_language_examples.tsv caption rows (8 columns)."""
    with open(path, "w") as f:
        for i, data in enumerate(jpegs):
            b64 = base64.urlsafe_b64encode(data).decode()
            f.write(f"img{i}\t{b64}\ta photo number {i}\t\t\tphoto\tbench\tcaption\n")


# ---------------------------------------------------------------------------------------------- the paths
def ofa_tsv_path(tsv: Path, seed: int) -> int:
    """(a) What OFA's dataset does per pretraining image-text row."""
    rng = random.Random(seed)
    n = 0
    with open(tsv) as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            img = Image.open(io.BytesIO(base64.urlsafe_b64decode(cols[1]))).convert("RGB")
            shorter = rng.choice(OFA_SHORTER_CHOICES)
            ow, oh = ofa_resize_size(img.width, img.height, shorter, OFA_MAX_SIDE)
            img = img.resize((ow, oh), Image.Resampling.BICUBIC)
            left, top = center_crop_offsets(ow, oh, OFA_CROP)
            img = img.crop((left, top, left + OFA_CROP, top + OFA_CROP))
            x = np.asarray(img, dtype=np.float32) / 255.0
            x = torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1).contiguous()
            n += 1
    return n


def _example_torch_resize(record: dict) -> list[dict]:
    rng = random.Random(record["seed"])
    return [{"image": random_resize_center_crop_tensor(record["image"], OFA_SHORTER_CHOICES, OFA_MAX_SIDE,
                                                       OFA_CROP, rng)}]


def _example_pil_resize(record: dict) -> list[dict]:
    rng = random.Random(record["seed"])
    img = random_resize_center_crop(record["image"], OFA_SHORTER_CHOICES, OFA_MAX_SIDE, OFA_CROP, rng)
    return [{"image": to_uint8_tensor(img)}]


def _stack(examples: list[dict]) -> torch.Tensor:
    return torch.stack([e["image"] for e in examples])


def shard_path(root: Path, decode_min_size: int | None, record_fn, batch: int, seed: int) -> int:
    """(b)/(c) The loader in one process: read, decode, crop + resize, uint8 batch."""
    cfg = LoaderConfig(root=str(root), composition={"vl": batch}, num_streams=1, seed=seed, mode="epochs",
                       epochs=1, decode_min_size={"vl": decode_min_size} if decode_min_size else {})
    loader = ShardLoader(cfg, record_fn=record_fn, collate_fn=_stack)
    return sum(batch.shape[0] for batch in loader)


def stored_bytes(root: Path) -> list[bytes]:
    out = []
    for shard in sorted((root / "vl").glob("vl-*.tar")):
        out.extend(s.get("jpg", s.get("png")) for s in iter_shard_samples(str(shard)))
    return out


def bare_decode(blobs: list[bytes]) -> int:
    """(d) Only the image decode of the stored bytes."""
    for data in blobs:
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(blobs)


CLOCK = time.process_time  # --wall switches to time.perf_counter


def timed(fn, *args) -> tuple[float, int]:
    """CPU seconds of this process (one thread): per-core cost, unaffected by other jobs sharing the machine."""
    start = CLOCK()
    n = fn(*args)
    return CLOCK() - start, n


def convert_once(tsv: Path, out: Path, workers: int, downscale: int | None, chunk_mb: float
                 ) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the converting process, CPU seconds of its workers) for one conversion, in a
    fresh interpreter started like `ofa-preprocess shards` (so its workers start as they do under the CLI)."""
    if out.exists():
        shutil.rmtree(out)
    code = ("import resource, time; from ofa_scale.data.convert import convert; t = time.perf_counter(); "
            "c = time.process_time(); "
            f"convert({str(out)!r}, vl={str(tsv)!r}, workers={workers}, downscale_shorter_side={downscale!r}, "
            f"chunk_mb={chunk_mb!r}, shard_size_mb=64); wall = time.perf_counter() - t; "
            # Stop the fork server (it has reaped the workers), so that its CPU time and theirs are counted.
            "from multiprocessing import forkserver; forkserver._forkserver._stop(); "
            "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(wall, time.process_time() - c, r.ru_utime + r.ru_stime)")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall, parent, workers_cpu = result.stdout.strip().splitlines()[-1].split()
    return float(wall), float(parent), float(workers_cpu)


def decode_and_write_floor(tsv: Path, out: Path) -> tuple[float, float, float]:
    """(wall, CPU, 0) seconds of the least any converter with the same checks does: per line split the columns,
    base64-decode the image, validate it like the converter (`check_image`), append the bytes to one file."""
    t, c = time.perf_counter(), time.process_time()
    with open(tsv, "rb") as f, open(out, "wb") as w:
        for line in f:
            cols = line.rstrip(b"\n").split(b"\t")
            w.write(check_image(decode_base64(cols[1])).data)
        w.flush()
        os.fsync(w.fileno())
    return time.perf_counter() - t, time.process_time() - c, 0.0


def import_cpu() -> float:
    """CPU seconds a fresh interpreter takes to import the converter: what the fork server pays once, before
    any worker exists (serial work in the CPU model below)."""
    code = "import time; import ofa_scale.data.convert; print(time.process_time())"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def conversion_table(big: Path, work: Path, repeats: int) -> None:
    """1 and 2 workers against the floor, interleaved repeats, medians."""
    big_mb = big.stat().st_size / 2**20
    chunk_mb = max(big_mb / 8, 0.05)  # several chunks so that 2 conversion workers both have work
    runs: dict[str, list[tuple[float, float, float]]] = {"floor": [], "1": [], "2": []}
    imports: list[float] = []
    load_before = load_average()
    for _ in range(repeats):
        for workers in (1, 2):
            runs[str(workers)].append(convert_once(big, work / "conversion_out", workers, None, chunk_mb))
        runs["floor"].append(decode_and_write_floor(big, work / "floor.bin"))
        imports.append(import_cpu())
    load_after = load_average()
    shutil.rmtree(work / "conversion_out")
    (work / "floor.bin").unlink()

    def rate(name: str, seconds) -> float:
        """Median MB/s over the repeats, `seconds(wall, parent CPU, workers' CPU, workers)` giving the time."""
        n = 1 if name == "floor" else int(name)
        return statistics.median(big_mb / seconds(*r, n) for r in runs[name])

    def wall(w, p, c, n):
        return w

    def cpu(w, p, c, n):
        return p + c

    start = statistics.median(imports)

    def idle(w, p, c, n):  # serial: the parent's CPU and the fork server's import; the rest evenly shared
        return p + c if n == 1 else p + start + (c - start) / n

    with open(big, "rb") as f:
        rows = sum(1 for _ in f)
    print(f"\nofa-preprocess shards on {big_mb:.0f} MB of TSV ({rows} rows, {chunk_mb:.1f} MB chunks), median of "
          f"{repeats} interleaved repeats; {os.cpu_count()} CPUs, load average (1/5/15 min) {load_before} before, "
          f"{load_after} after")
    print(f"{'run':58} {'wall MB/s':>9} {'vs 1 w':>7} {'per worker':>10} {'MB/CPU-s':>9} {'vs floor':>8} "
          f"{'CPU-model MB/s':>14} {'vs 1 w':>7}")
    floor = rate("floor", cpu)
    for name, label in (("floor", "decode-and-write floor, 1 process"), ("1", "conversion, 1 worker"),
                        ("2", "conversion, 2 workers")):
        n = 1 if name == "floor" else int(name)
        w, c, m = rate(name, wall), rate(name, cpu), rate(name, idle)
        vs_wall = f"{w / rate('1', wall):6.2f}x" if name != "floor" else ""
        vs_model = f"{m / rate('1', idle):6.2f}x" if name != "floor" else ""
        print(f"{label:58} {w:9.1f} {vs_wall:>7} {w / n:10.1f} {c:9.1f} {c / floor:7.2f}x {m:14.1f} {vs_model:>7}")
    print("MB/CPU-s: MB per CPU-second of all processes of the run (parent and workers), unaffected by other "
          "jobs; 'vs floor' is the per-core efficiency.\nCPU-model MB/s: MB / (parent CPU + workers' CPU / "
          f"workers), serial: the parent's CPU and the fork server's import ({start:.2f} s); the wall time of an "
          "idle machine if the workers' share were evenly split.\nWall MB/s "
          "is only fair on an idle machine (see the load average).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small image set and 3 repeats (< 2 minutes)")
    parser.add_argument("--images", type=int, help="photos in the set (default 96; --quick: 24)")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (median reported)")
    parser.add_argument("--convert-copies", type=int, help="times the TSV is repeated as conversion input")
    parser.add_argument("--wall", action="store_true", help="time the paths in wall seconds (idle machines)")
    parser.add_argument("--convert-only", action="store_true", help="only the conversion table")
    parser.add_argument("--workdir", help="where to write the TSV and shards (default: a temp dir, removed)")
    args = parser.parse_args()
    images = args.images or (24 if args.quick else 96)
    repeats = max(3, args.repeats or (3 if args.quick else 5))
    torch.set_num_threads(1)
    global CLOCK
    CLOCK = time.perf_counter if args.wall else time.process_time
    clock = "wall" if args.wall else "CPU"

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ofa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        jpegs = make_jpegs(images)
        tsv = work / "vision_language_examples.tsv"
        write_vl_tsv(tsv, jpegs)
        tsv_mb = tsv.stat().st_size / 2**20
        # Conversion input: the same rows repeated, so that process start-up is a small part of the time.
        big = work / "conversion_input.tsv"
        with open(big, "wb") as f:
            for _ in range(args.convert_copies or (1 if args.quick else 4)):
                f.write(tsv.read_bytes())
        conversion_table(big, work, repeats)
        if args.convert_only:
            return
        chunk_mb = max(tsv.stat().st_size / 2**20 / 8, 0.05)
        convert_once(tsv, work / "shards_default", 1, None, chunk_mb)
        convert_once(tsv, work / "shards_480", 1, 480, chunk_mb)
        blobs_default = stored_bytes(work / "shards_default")
        blobs_480 = stored_bytes(work / "shards_480")

        default, small = work / "shards_default", work / "shards_480"
        batch = math.gcd(images, BATCH)  # whole micro-batches, so every photo is measured
        paths = {
            "(a) OFA-style TSV path (full decode, resize, crop, float)": (ofa_tsv_path, tsv),
            "(b) shards, default conversion": (shard_path, default, None, _example_torch_resize, batch),
            "(b) shards, default conversion + draft decode >= 480": (shard_path, default, 480, _example_torch_resize,
                                                                     batch),
            "(c) shards, --downscale-shorter-side 480": (shard_path, small, None, _example_torch_resize, batch),
            "(c) same, Pillow crop-before-resize instead of torch": (shard_path, small, None, _example_pil_resize,
                                                                     batch),
            "(d) bare decode of stored bytes, default shards": (bare_decode, blobs_default),
            "(d) bare decode of stored bytes, downscaled shards": (bare_decode, blobs_480),
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(repeats):
            for name, (fn, *fargs) in paths.items():
                if fn in (ofa_tsv_path, shard_path):
                    fargs = [*fargs, rep]
                seconds, n = timed(fn, *fargs)
                assert n == images, (name, n)
                rates[name].append(n / seconds)

        base = statistics.median(rates[next(iter(paths))])
        sizes = ", ".join(f"{w}x{h}" for w, h in SIZES)
        print(f"\n{images} photos (JPEG q90, equal parts {sizes}), TSV {tsv_mb:.1f} MB, "
              f"median of {repeats} repeats, samples per {clock}-second of one core")
        print(f"{'measurement':58} {'median':>10} {'unit':>14} {'vs (a)':>8}")
        for name, values in rates.items():
            med = statistics.median(values)
            print(f"{name:58} {med:10.1f} {'samples/s/core':>14} {med / base:7.2f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

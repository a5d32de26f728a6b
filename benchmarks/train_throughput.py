"""Trainer throughput: examples/s and input tokens/s of `ofa-train`, measured side by side in one run.

CPU (always): the ofa_tiny preset (reduced image sizes so a step fits a CPU core) on 1 and 2 ranks (gloo, ZeRO-3),
same global batch. GPU (when CUDA is available): ofa_base and ofa_large in bf16 on one GPU, with MFU from
ofa_scale.model.flops. Each configuration runs the real trainer (`python -m ofa_scale.train`, or torchrun for 2
ranks) on a synthetic sample corpus; the table reports medians over the steps after --skip warm-up steps, and
ratios against the first row of its device.

    python benchmarks/train_throughput.py [--steps 12] [--skip 2] [--rows 400]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def make_data(work: Path, rows: int) -> dict[str, Path]:
    py = [sys.executable, "-m", "ofa_scale.cli.preprocess"]
    c = work / "corpus"
    sh(py + ["sample", "--out", str(c), "--rows", str(rows)])
    sh(py + ["shards", "--vl", str(c / "vision_language_examples.tsv"), "--text", str(c / "text_examples.tsv"),
             "--image", str(c / "image_examples.tsv"), "--detection", str(c / "detection_examples.tsv"),
             "--negatives", str(c / "negative_sample"), "--out", str(work / "shards"), "--workers", "2",
             "--no-progress"])
    sh(py + ["train-tokenizer", "--input", str(c / "vision_language_examples.tsv"), str(c / "text_examples.tsv"),
             "--vocab-size", "2000", "--soft-vocab-limit", "--out", str(work / "tok")])
    return {"shards": work / "shards", "tok": work / "tok"}


def config(data: dict[str, Path], arch: str, steps: int, precision: str, image: int, micro: int, global_: int,
           zero: int) -> dict:
    return {
        "model": {"arch": arch},
        "data": {"root": str(data["shards"]), "tokenizer": {"kind": "sentencepiece", "path": str(data["tok"])},
                 "num_workers": 1, "shuffle_buffer": 16},
        "objectives": {"mix": {"vl": 2, "text": 1, "image": 1, "detection": 1}, "random_augment": False,
                       "vl": {"image_size": image, "source_length": 64, "target_length": 32},
                       "aux": {"image_size": image, "source_length": 96, "target_length": 260}},
        "train": {"steps": steps, "global_batch_size": global_, "micro_batch_size": micro, "ckpt_interval": 10**6,
                  "log_interval": 10**6},
        "precision": precision,
        "parallel": {"zero_stage": zero},
        "logging": {"mlflow": False},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(work: Path, name: str, cfg: dict, nproc: int, skip: int) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = work / name
    args = ["-m", "ofa_scale.train", "--config", str(path), "--run-dir", str(run_dir)]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *args]
    t0 = time.perf_counter()
    sh(cmd)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][skip:]
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    return {"name": name, "ranks": nproc,
            "samples_per_s": statistics.median(r["samples_per_s"] for r in records),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "step_s": statistics.median(r["step_time_s"] for r in records),
            "mfu": statistics.median(mfu) if mfu else None, "wall_s": wall}


def print_table(rows: list[dict], device: str) -> None:
    print(f"\n{device}: medians over measured steps; ratio = examples/s relative to the first row")
    print(f"{'configuration':<34}{'ranks':>6}{'step s':>9}{'examples/s':>12}{'tokens/s':>11}{'MFU':>8}{'ratio':>7}")
    base = rows[0]["samples_per_s"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['name']:<34}{r['ranks']:>6}{r['step_s']:>9.3f}{r['samples_per_s']:>12.1f}"
              f"{r['tokens_per_s']:>11.0f}{mfu:>8}{r['samples_per_s'] / base:>7.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first steps left out (start-up, ZeRO-3 tracing)")
    p.add_argument("--rows", type=int, default=400, help="image-text rows of the synthetic corpus")
    p.add_argument("--image-size", type=int, default=64, help="CPU image size (the tiny preset's stem is costly)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ofa_train_bench_") as tmp:
        work = Path(tmp)
        data = make_data(work, args.rows)
        cpu_env = {"CUDA_VISIBLE_DEVICES": ""}
        os.environ.update(cpu_env)
        cpu = [measure(work, "ofa_tiny fp32 ZeRO-3 (CPU)", config(data, "ofa_tiny", args.steps, "fp32",
                                                               args.image_size, 2, 8, 3), 1, args.skip),
               measure(work, "ofa_tiny fp32 ZeRO-3 (CPU) dp2", config(data, "ofa_tiny", args.steps, "fp32",
                                                                   args.image_size, 2, 8, 3), 2, args.skip)]
        os.environ.pop("CUDA_VISIBLE_DEVICES")
        print_table(cpu, f"CPU ({os.cpu_count()} cores)")
        import torch

        if torch.cuda.is_available():
            gpu = []
            for arch in ("ofa_base", "ofa_large"):
                gpu.append(measure(work, f"{arch} bf16 ZeRO-1 384/256 px",
                                   {**config(data, arch, args.steps, "bf16", 384, 8, 8, 1),
                                    "objectives": {"mix": {"vl": 8, "text": 2, "image": 1, "detection": 1}}},
                                   1, args.skip))
            print_table(gpu, torch.cuda.get_device_name())


if __name__ == "__main__":
    main()

"""Data and launch helpers of the engine tests: tiny caption shards (32-px images), a tiny-model finetuning config,
and `ofa-train` / `ofa-eval` runs (1 process, or N under torchrun) with the fake task installed."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
BPE_DIR = REPO.parent / "shared" / "ofa-bpe"
WORKER = Path(__file__).with_name("engine_worker.py")

sys.path.insert(0, str(REPO / "tests" / "parallel"))
import zygote  # noqa: E402
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _jpeg_b64(colour) -> str:
    img = Image.new("RGB", (40, 32), colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return base64.urlsafe_b64encode(buf.getvalue()).decode()


def caption_shards(root: Path, name: str, rows: int, skip: tuple[int, ...] = ()) -> Path:
    """`rows` caption rows (image ids 100, 101, ...; captions naming the image's colour) as shards; rows whose
    index is in `skip` get a caption the fake task's eval_item skips."""
    names = list(COLOURS)
    lines = []
    for i in range(rows):
        colour = names[i % len(names)]
        caption = f"skip {colour}" if i in skip else f"{colour} square number {i % 3}&&a {colour} square"
        lines.append(f"{i}\t{100 + i}\t{caption}\t\t{_jpeg_b64(COLOURS[colour])}")
    tsv = root / f"{name}.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    out = root / name
    _run([sys.executable, "-m", "ofa_scale.cli.preprocess", "shards", "--format", "caption", "--input", str(tsv),
          "--out", str(out), "--no-progress", "--workers", "1"])
    return out


def finetune_config(train_shards: Path, valid_shards: Path, **sections) -> dict:
    cfg = {
        "model": {"arch": "ofa_tiny",
                  "overrides": {"d_model": 32, "ffn_dim": 64, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
                                "dropout": 0.0, "attention_dropout": 0.0}},
        "data": {"train": str(train_shards), "valid": str(valid_shards), "num_workers": 0, "shuffle_buffer": 4,
                 "tokenizer": {"kind": "gpt2-bpe", "path": str(BPE_DIR)}},
        "task": {"name": "caption", "image_size": 32, "valid_interval": 0,
                 "decoding": {"beam": 2, "max_len_b": 5, "batch_size": 2}},
        "optim": {"lr": 2.0e-3},
        "schedule": {"warmup_steps": 1},
        "train": {"epochs": 2, "global_batch_size": 4, "micro_batch_size": 2, "ckpt_interval": 100},
        "parallel": {"zero_stage": 1},
        "logging": {"mlflow": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int = 300, env: dict | None = None, check: bool = True):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def launch(tool: str, *args: str, nproc: int = 1, timeout: int = 300, env: dict | None = None, check: bool = True):
    """`tool` is "train" or "eval"; the worker installs the fake task first. The ranks are forked from the test
    zygote (tests/parallel/zygote.py) with the variables torchrun sets; torchrun itself is covered by tests/train."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **zygote.IMPORT_TIME_ENV, **(env or {})}
    if not zygote.usable(full_env):
        return _launch_torchrun(tool, *args, nproc=nproc, timeout=timeout, env=env, check=check)
    with tempfile.TemporaryDirectory(prefix="engine-launch-") as logs:
        proc = zygote.run([str(WORKER), tool, *args], full_env, Path(logs) / "log", world=nproc, cwd=REPO,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}) on {nproc} ranks:\n"
                             f"{proc.stdout[-8000:]}")
    return proc


def _launch_torchrun(tool: str, *args: str, nproc: int, timeout: int, env: dict | None, check: bool):
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), tool, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(WORKER), tool, *args]
    return _run(cmd, timeout=timeout, env=env, check=check)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

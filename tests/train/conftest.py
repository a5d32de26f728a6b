"""Fixtures for the trainer tests: a tiny sample corpus → shards → SentencePiece tokenizer, built once per session,
and helpers that launch `ofa-train` in subprocesses (1 process, or 2 under torchrun) the way users do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "parallel"))
import zygote  # noqa: E402


def _run(cmd: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Shards and a tokenizer from 64 synthetic image-text rows (plus the proportional auxiliary rows)."""
    root = tmp_path_factory.mktemp("train_data")
    py = sys.executable
    _run([py, "-m", "ofa_scale.cli.preprocess", "sample", "--out", str(root / "corpus"), "--rows", "64"], root)
    c = root / "corpus"
    _run([py, "-m", "ofa_scale.cli.preprocess", "shards", "--vl", str(c / "vision_language_examples.tsv"),
          "--text", str(c / "text_examples.tsv"), "--image", str(c / "image_examples.tsv"),
          "--detection", str(c / "detection_examples.tsv"), "--negatives", str(c / "negative_sample"),
          "--out", str(root / "shards"), "--workers", "1", "--no-progress"], root)
    _run([py, "-m", "ofa_scale.cli.preprocess", "train-tokenizer", "--input", str(c / "vision_language_examples.tsv"),
          str(c / "text_examples.tsv"), "--vocab-size", "400", "--soft-vocab-limit", "--out", str(root / "tok")], root)
    return {"shards": root / "shards", "tokenizer": root / "tok"}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 in its own process group, killed (with its workers) afterwards."""
    import signal
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not come up:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def tiny_config(data: dict[str, Path], **sections) -> dict:
    """A config small enough for 2 CPU cores: 1+1 layers of width 32, 32-px images, all eight objectives."""
    cfg = {
        "model": {"arch": "ofa_tiny",
                  "overrides": {"d_model": 32, "ffn_dim": 64, "heads": 2, "encoder_layers": 1, "decoder_layers": 1}},
        "data": {"root": str(data["shards"]), "tokenizer": {"kind": "sentencepiece", "path": str(data["tokenizer"])},
                 "num_workers": 0, "shuffle_buffer": 4},
        "objectives": {"mix": {"vl": 2, "text": 1, "image": 1, "detection": 1}, "random_augment": False,
                       "vl": {"image_size": 32, "source_length": 40, "target_length": 16},
                       "aux": {"image_size": 32, "source_length": 48, "target_length": 260}},
        "optim": {"lr": 2.0e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"steps": 10, "global_batch_size": 4, "micro_batch_size": 2, "ckpt_interval": 100},
        "parallel": {"zero_stage": 3},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, run_dir: Path, *extra: str, nproc: int = 1, env: dict | None = None,
              timeout: int = 300, launcher: str = "fork") -> subprocess.CompletedProcess:
    """`ofa-train` on `nproc` ranks. launcher "fork": ranks forked from the test zygote (tests/parallel/zygote.py,
    which has torch/DeepSpeed/megatron imported already) with torchrun's variables; "torchrun": the user's way (one
    end-to-end test keeps it)."""
    args = ["--config", str(config), "--run-dir", str(run_dir), *extra]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **zygote.IMPORT_TIME_ENV, **(env or {})}
    if launcher == "fork" and zygote.usable(full_env):
        with tempfile.TemporaryDirectory(prefix="ofa-train-") as logs:
            proc = zygote.run(["-m", "ofa_scale.train", *args], full_env, Path(logs) / "log", world=nproc, cwd=REPO,
                              timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"ofa-train {' '.join(args)} failed ({proc.returncode}) on {nproc} ranks:\n"
                                 f"{proc.stdout[-8000:]}")
        return proc
    if nproc == 1:
        cmd = [sys.executable, "-m", "ofa_scale.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ofa_scale.train", *args]
    return _run(cmd, REPO, timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

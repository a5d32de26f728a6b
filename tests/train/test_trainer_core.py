"""The trainer's core: `--check` on every shipped config, layout-free initial weights, non-finite steps, extending a
finished run, and memory in every log line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.conftest import REPO, read_metrics, run_train, tiny_config, write_config

SHARED_BPE = REPO.parent / "shared" / "ofa-bpe"
# configs/finetune/* need shards of their task's format: tests/configs/test_finetune_recipes.py checks each of them
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "finetune" not in p.parts)


def _check(config: Path, data, world: int | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cfg = yaml.safe_load(config.read_text())
    kind = cfg.get("data", {}).get("tokenizer", {}).get("kind", "gpt2-bpe")
    tok = SHARED_BPE if kind == "gpt2-bpe" else data["tokenizer"]
    par = cfg.get("parallel", {})
    world = world or par.get("tp", 1) * par.get("pp", 1)
    cmd = [sys.executable, "-m", "ofa_scale.train", "--config", str(config), "--check", "--world-size", str(world),
           "--set", f"data.root={data['shards']}", "--set", f"data.tokenizer.path={tok}",
           "--set", "model.pretrained=null", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_check_builds_every_config_on_the_meta_device(config, tiny_data):
    from ofa_scale.model.config import OFAConfig
    from ofa_scale.parallel.planner import total_params

    proc = _check(config, tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "config is valid" in out and "parameters per rank" in out and "planner estimate" in out
    arch = yaml.safe_load(config.read_text())["model"]["arch"]
    stage0 = int(out.split("stage 0: ")[1].split(" parameters")[0].replace(",", ""))
    # the meta build and the planner count the same model (vocabulary from the tokenizer the check loaded)
    vocab = int(out.split("vocabulary ")[1].split(",")[0])
    overrides = {k: v for k, v in yaml.safe_load(config.read_text())["model"].get("overrides", {}).items()
                 if k in {f for f in OFAConfig.__dataclass_fields__}}
    assert stage0 == total_params(OFAConfig.preset(arch, vocab_size=vocab, **overrides))


def test_check_reports_each_rank_under_tp_and_pp(tiny_data):
    huge = REPO / "configs" / "pretrain_ofa_huge.yaml"
    proc = _check(huge, tiny_data, world=8, extra=("--set", "parallel.tp=2", "--set", "parallel.pp=2",
                                                   "--set", "parallel.zero_stage=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = [int(line.split(": ")[1].split(" ")[0].replace(",", ""))
              for line in proc.stdout.splitlines() if line.strip().startswith("stage ")]
    assert len(stages) == 2
    whole = int(proc.stdout.split("(")[2].split(" parameters")[0].replace(",", ""))
    # two TP halves of two stages, plus the tied embedding held by both end stages: about half the model each
    assert whole / 2 * 0.9 < sum(stages) < whole * 0.75


def test_check_refuses_a_layout_that_does_not_fit_the_world(tiny_data):
    proc = _check(REPO / "configs" / "demo.yaml", tiny_data, world=3)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_meta_build_gives_the_single_process_initial_weights():
    from ofa_scale.model import OFAModel
    from ofa_scale.model.config import OFAConfig
    from ofa_scale.model.init import init_weights
    from ofa_scale.training.prepare import materialise

    cfg = OFAConfig.preset("ofa_tiny", vocab_size=300, d_model=64, ffn_dim=128, heads=4, encoder_layers=2,
                           decoder_layers=2)
    plain = OFAModel(cfg)
    init_weights(plain, seed=11)
    with torch.device("meta"):
        lazy = OFAModel(cfg)
    materialise(None, lazy, cfg, seed=11, is_meta=True)
    want, got = plain.state_dict(), lazy.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert lazy.decoder.output_projection.weight is lazy.encoder.embed_tokens.weight  # still tied
    other = OFAModel(cfg)
    init_weights(other, seed=12)
    assert not torch.equal(other.encoder.embed_tokens.weight, plain.encoder.embed_tokens.weight)


@pytest.fixture(scope="module")
def finite_run(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("core")
    cfg = tiny_config(tiny_data, train={"steps": 4, "ckpt_interval": 2, "keep_checkpoints": 2},
                      logging={"mlflow": False})
    config = write_config(work / "c.yaml", cfg)
    run_train(config, work / "run")
    return work, cfg


def test_every_record_carries_memory(finite_run):
    work, _ = finite_run
    for record in read_metrics(work / "run"):
        assert record["host_peak_gib"] > 0.1
        assert record["host_peak_gib_min"] <= record["host_peak_gib"]
        assert record["host_peak_rank"] == 0
        # the loader's damage counters, summed over data-parallel ranks, ride in every line too
        assert record["data/corrupt_shards"] == 0 and record["data/truncated_shards"] == 0
        assert record["data/records"] > 0


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(finite_run):
    """lr=inf from step 3 on: the weights turn non-finite, the next steps are counted, metrics.jsonl stays JSON,
    no checkpoint is written from the broken weights and the last finite one survives pruning (keep=1)."""
    work, cfg = finite_run
    bad = work / "bad"
    import shutil

    shutil.copytree(work / "run", bad)
    cfg = {**cfg, "train": {**cfg["train"], "steps": 10, "max_nonfinite_steps": 2}, "optim": {"lr": float("inf")}}
    config = write_config(work / "bad.yaml", cfg)
    with pytest.raises(AssertionError) as failure:
        run_train(config, bad, "--resume")
    text = str(failure.value)
    assert "steps in a row had a non-finite loss or gradient norm" in text and "Traceback" not in text
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no bare NaN
    assert "NaN" not in "".join(lines)
    broken = [r for r in records if r["step"] > 4]
    assert broken and broken[-1]["nonfinite_steps"] == 2
    assert any(r["loss"] is None and "loss" in r["nonfinite"] for r in broken)
    ckpts = bad / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert (ckpts / "step_000004").is_dir()
    assert not (ckpts / "step_000006").exists()


def test_raising_train_steps_continues_on_a_recomputed_schedule(finite_run):
    from ofa_scale.training.schedule import PolynomialDecay

    work, cfg = finite_run
    import shutil

    longer = work / "longer"
    shutil.copytree(work / "run", longer)
    cfg = {**cfg, "train": {**cfg["train"], "steps": 6}}
    config = write_config(work / "longer.yaml", cfg)
    run_train(config, longer, "--resume")
    records = {r["step"]: r for r in read_metrics(longer)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    schedule = PolynomialDecay(total_steps=6, warmup_steps=cfg["schedule"]["warmup_steps"], peak_lr=cfg["optim"]["lr"])
    assert records[5]["lr"] == pytest.approx(schedule.lr_at(4)) and records[5]["lr"] > 0
    assert records[6]["lr"] == pytest.approx(schedule.lr_at(5))


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(finite_run):
    """A flipped byte in the newest checkpoint: --resume warns once, continues from the previous step, and replays
    the lost steps with exactly the losses of the original run."""
    import shutil

    work, cfg = finite_run
    damaged = work / "damaged"
    shutil.copytree(work / "run", damaged)
    newest = damaged / "checkpoints" / "step_000004"
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_train(write_config(work / "damaged.yaml", cfg), damaged, "--resume")
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "step_000004" in line]
    assert any("step_000002" in line for line in warnings), proc.stdout[-2000:]
    original = {r["step"]: r for r in read_metrics(work / "run")}
    again = {r["step"]: r for r in read_metrics(damaged)}
    assert sorted(again) == [1, 2, 3, 4]
    for step in (3, 4):
        assert again[step]["loss"] == original[step]["loss"]


def test_a_signal_during_start_up_ends_in_a_checkpoint_not_a_crash(tiny_data, tmp_path):
    """SIGTERM before the first step (while DeepSpeed and the model are still being built) is remembered: the
    trainer runs to its first step boundary, checkpoints, writes status.json 'stopped' and exits 0."""
    import os
    import signal
    import time

    cfg = tiny_config(tiny_data, train={"steps": 50, "ckpt_interval": 100}, logging={"mlflow": False})
    config = write_config(tmp_path / "c.yaml", cfg)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ofa_scale.train", "--config", str(config), "--run-dir",
                             str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(3)  # imports done, handlers installed, nothing trained yet
    assert not (run_dir / "metrics.jsonl").exists()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step 1 (SIGTERM received)" in out
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {"state": "stopped", "step": 1, "steps": 50}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"

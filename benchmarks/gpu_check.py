"""GPU check: the trainer, the model step and generation on one CUDA GPU, in one command and one table.

    python benchmarks/gpu_check.py                      # a CUDA machine: a few minutes on one H100/H200
    python benchmarks/gpu_check.py --device cpu --tiny  # the same code paths on CPU with a tiny model

1. trainer: `python -m ofa_scale.train` for --train-steps steps (20) on one GPU in bf16, with ZeRO-1 and with
   ZeRO-3, on a synthetic sample corpus (sample → shards → tokenizer, as scripts/demo.sh). On CUDA the trainer
   creates its default process group as `cpu:gloo,cuda:nccl` (parallel/collectives.py), so ZeRO's traffic runs
   on NCCL. Reported: median step time, tokens/s and MFU from its metrics.jsonl (after --skip warm-up steps),
   the accelerator peak memory when logged, and the first → last loss (a non-finite loss fails the row).
2. model step: one forward + backward of ofa_base and ofa_large at 384 px in bf16, math vs SDPA attention
   (`model.set_attention_impl`), run interleaved after warm-up; tokens/s counts image + source + target tokens,
   MFU = ofa_scale/model/flops.py's training FLOPs / time / the device's dense peak
   (ofa_scale/training/workload.PEAK_TFLOPS, or --peak-tflops).
3. generation: greedy and beam-search decoding (ofa_scale/model/generate.py, KV cache) of a fixed number of tokens
   per sample (eos is banned until --gen-len and forced there, so every run decodes the same tokens whatever the
   random weights prefer); generated tokens/s.

A check that fails becomes a FAILED row with its error's last line and the others still run; the exit status is 1
when any row failed. `--json FILE` also writes the rows. `--tiny` shrinks every size (model, images, batch, steps)
so that the whole script runs on a CPU in 1–3 minutes of CPU time (tests/benchmarks/test_gpu_check.py runs it
so); the model-step and generation checks stay in bf16 there, the trainer runs fp32 (DeepSpeed's CPU path, gloo).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))  # train_throughput's corpus and config helpers
sys.path.insert(0, str(REPO))

CHECKS = ("trainer", "step", "generate")
IMPLS = ("math", "sdpa")
# The model-step and generation checks run in bf16 on CPU too, so the dry run executes the GPU run's dtype paths.
MODEL_DTYPE = "bf16"
# --tiny: a model small enough for a CPU step in well under a second, with every structural part of OFA present
TINY_OVERRIDES = dict(d_model=64, ffn_dim=128, heads=2, encoder_layers=1, decoder_layers=1)


@dataclass
class Row:
    check: str
    config: str
    ok: bool = True
    seconds: Optional[float] = None  # median step / decode time
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    peak_gib: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def failed(check: str, config: str, error: BaseException | str) -> Row:
    text = str(error).strip().splitlines()
    return Row(check, config, ok=False, note="FAILED: " + (text[-1] if text else type(error).__name__)[:160])


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    device: str
    tiny: bool
    train_precision: str  # bf16 on CUDA; fp32 for the CPU dry run (DeepSpeed's CPU path is an fp32 path)
    archs: list[str]
    image_size: int
    batch: int
    src_len: int
    tgt_len: int
    warmup: int
    repeats: int
    train_steps: int
    skip: int
    rows: int
    gen_batch: int
    gen_len: int
    beam: int
    peak_tflops: Optional[float]
    train_timeout: int

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def settings_from_args(args) -> Settings:
    tiny = args.tiny
    return Settings(
        device=args.device, tiny=tiny, train_precision="bf16" if args.device.startswith("cuda") else "fp32",
        archs=(args.archs or ("ofa_tiny" if tiny else "ofa_base,ofa_large")).split(","),
        image_size=args.image_size or (32 if tiny else 384), batch=args.batch or (2 if tiny else 8),
        src_len=args.src_len or (8 if tiny else 64), tgt_len=args.tgt_len or (6 if tiny else 32),
        warmup=0 if tiny else 2, repeats=args.repeats or (1 if tiny else 5),
        train_steps=args.train_steps or (2 if tiny else 20), skip=1 if tiny else 5, rows=40 if tiny else 400,
        gen_batch=2 if tiny else 16, gen_len=args.gen_len or (3 if tiny else 20), beam=2 if tiny else 5,
        peak_tflops=args.peak_tflops, train_timeout=args.train_timeout)


def model_config(s: Settings, arch: str):
    from ofa_scale.model.config import OFAConfig

    return OFAConfig.preset(arch, **(TINY_OVERRIDES if s.tiny else {}))


def peak_tflops(s: Settings) -> Optional[float]:
    """Dense peak of the device for MFU; None on CPU or an unknown GPU (MFU is then left out)."""
    if s.peak_tflops:
        return s.peak_tflops
    if not s.cuda:
        return None
    import torch

    from ofa_scale.training.workload import PEAK_TFLOPS

    name = torch.cuda.get_device_name(torch.device(s.device))
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def image_tokens(cfg, image_size: int) -> int:
    from ofa_scale.model.flops import resnet_forward_flops

    _, h, w = resnet_forward_flops(cfg, image_size, image_size)
    return h * w


# ------------------------------------------------------------------------------------------------- 1. trainer
def trainer_config(s: Settings, data: dict[str, Path], zero: int) -> dict:
    from train_throughput import config

    if s.tiny:
        cfg = config(data, "ofa_tiny", s.train_steps, s.train_precision, s.image_size, 2, 2, zero)
        cfg["model"]["overrides"] = dict(TINY_OVERRIDES)
        cfg["data"]["num_workers"] = 0  # one process less to start; the loader path is the same
        cfg["objectives"]["vl"].update(source_length=32, target_length=16)
        return cfg
    # OFA's 8:2:1:1 mix and its default shapes (384-px image-text rows, 256-px auxiliary rows)
    cfg = config(data, "ofa_base", s.train_steps, s.train_precision, s.image_size, 8, 8, zero)
    cfg["objectives"] = {"mix": {"vl": 8, "text": 2, "image": 1, "detection": 1}}
    return cfg


def run_trainer(s: Settings, work: Path, data: dict[str, Path], zero: int) -> Row:
    import yaml

    cfg = trainer_config(s, data, zero)
    shapes = "" if s.tiny else ", OFA's shapes and 8:2:1:1 mix"
    name = (f"{cfg['model']['arch']}{' tiny' if s.tiny else ''} {s.train_precision} ZeRO-{zero}, {s.train_steps} steps"
            f"{shapes}")
    path, run_dir = work / f"zero{zero}.yaml", work / f"zero{zero}"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not s.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed then picks its CPU accelerator (gloo)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "ofa_scale.train", "--config", str(path), "--run-dir",
                               str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=s.train_timeout)
    except subprocess.TimeoutExpired:
        return failed("trainer", name, f"no result within --train-timeout {s.train_timeout} s")
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        row = failed("trainer", name, proc.stderr or proc.stdout or f"exit status {proc.returncode}")
        row.extra["output_tail"] = (proc.stdout + proc.stderr)[-4000:]  # in --json, for the full story
        return row
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [r for r in records if "step_time_s" in r]
    if len(steps) < s.train_steps:
        return failed("trainer", name, f"metrics.jsonl has {len(steps)} steps, expected {s.train_steps}")
    losses = [r.get("loss") for r in steps]
    if any(v is None or not math.isfinite(v) for v in losses) or any(r.get("skipped") for r in steps):
        return failed("trainer", name, f"non-finite or skipped steps; losses {losses}")
    timed = steps[s.skip:] or steps
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    peaks = [r["accel_peak_gib"] for r in steps if r.get("accel_peak_gib") is not None]
    from ofa_scale.parallel.collectives import backend_for

    backend = backend_for("cuda" if s.cuda else "cpu")  # the default group the trainer created (its policy)
    return Row("trainer", name, seconds=statistics.median(r["step_time_s"] for r in timed),
               tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
               mfu=statistics.median(mfu) if mfu else None, peak_gib=max(peaks) if peaks else None,
               note=f"{backend}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; {wall:.0f} s wall",
               extra={"losses": losses, "steps": len(steps)})


def trainer_rows(s: Settings, work: Path) -> list[Row]:
    from train_throughput import make_data

    try:
        data = make_data(work, s.rows)
    except SystemExit as e:  # make_data ends the process on a failed preprocessing command
        return [failed("trainer", "sample corpus -> shards -> tokenizer", str(e))]
    return [run_trainer(s, work, data, zero) for zero in (1, 3)]


# ------------------------------------------------------------------------------------------------- 2. model step
def random_inputs(cfg, s: Settings, batch: int, device, dtype, generator):
    """Model kwargs with uint8 images normalised exactly as the trainer does (objectives.batching)."""
    import torch

    from ofa_scale.objectives.batching import normalise_images

    images = torch.randint(0, 256, (batch, 3, s.image_size, s.image_size), generator=generator, dtype=torch.uint8)
    masks = torch.ones(batch, dtype=torch.bool)
    return {"src_tokens": torch.randint(4, cfg.vocab_size, (batch, s.src_len), generator=generator).to(device),
            "patch_images": normalise_images(images.to(device), masks.to(device), dtype),
            "patch_masks": masks.to(device)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def step_rows_for(s: Settings, arch: str, device, dtype, peak: Optional[float]) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from ofa_scale.model import OFAModel
    from ofa_scale.model.flops import step_flops

    cfg = model_config(s, arch)
    torch.manual_seed(0)
    model = OFAModel(cfg).to(device=device, dtype=dtype).train()
    g = torch.Generator().manual_seed(0)
    inputs = random_inputs(cfg, s, s.batch, device, dtype, g)
    inputs["prev_output_tokens"] = torch.randint(4, cfg.vocab_size, (s.batch, s.tgt_len), generator=g).to(device)
    target = torch.randint(4, cfg.vocab_size, (s.batch, s.tgt_len), generator=g).to(device)

    def step():
        logits = model(**inputs)
        F.cross_entropy(logits.float().flatten(0, 1), target.flatten()).backward()
        model.zero_grad(set_to_none=True)

    flops = step_flops(cfg, s.batch, s.src_len, s.tgt_len, s.image_size).train_step
    tokens = s.batch * (image_tokens(cfg, s.image_size) + s.src_len + s.tgt_len)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    peaks: dict[str, Optional[float]] = {}
    for impl in IMPLS:  # warm-up each path (allocator, kernel selection), then its peak memory over one step
        model.set_attention_impl(impl)
        for _ in range(s.warmup):
            step()
        if device.type == "cuda":
            reset_peak(device)
            step()
        peaks[impl] = peak_gib(device)
    for _ in range(s.repeats):  # interleaved, so machine noise hits both paths alike
        for impl in IMPLS:
            model.set_attention_impl(impl)
            times[impl].append(timed(step, device))
    rows, base = [], statistics.median(times[IMPLS[0]])
    for impl in IMPLS:
        med = statistics.median(times[impl])
        rows.append(Row("model step", f"{arch}{' tiny' if s.tiny else ''} {s.image_size}px {MODEL_DTYPE} "
                                      f"b{s.batch} {impl}",
                        seconds=med, tokens_per_s=tokens / med, mfu=flops / med / (peak * 1e12) if peak else None,
                        peak_gib=peaks[impl], note=f"{flops / med / 1e12:.2f} TFLOP/s; {med / base:.2f}x {IMPLS[0]}",
                        extra={"times": times[impl]}))
    return rows


def step_rows(s: Settings, device, dtype) -> list[Row]:
    import torch

    peak = peak_tflops(s)
    rows: list[Row] = []
    for arch in s.archs:
        try:
            rows += step_rows_for(s, arch, device, dtype, peak)
        except Exception as e:  # e.g. out of memory: report it and go on with the next check
            rows.append(failed("model step", f"{arch} {s.image_size}px {MODEL_DTYPE}", e))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------- 3. generation
def generation_rows_for(s: Settings, arch: str, device, dtype) -> list[Row]:
    import torch

    from ofa_scale.model import OFAModel
    from ofa_scale.model.generate import GenerationConfig, generate

    cfg = model_config(s, arch)
    torch.manual_seed(0)
    model = OFAModel(cfg).to(device=device, dtype=dtype).eval()
    batch = random_inputs(cfg, s, s.gen_batch, device, dtype, torch.Generator().manual_seed(1))
    fixed = dict(min_len=s.gen_len, max_len_a=0.0, max_len_b=s.gen_len)  # exactly gen_len tokens, then eos
    rows = []
    for label, gen_cfg in (("greedy", GenerationConfig(greedy=True, **fixed)),
                           (f"beam {s.beam}", GenerationConfig(beam_size=s.beam, nbest=1, **fixed))):
        out: list = []

        def run():
            out[:] = generate(model, batch, gen_cfg)

        for _ in range(s.warmup):
            run()
        reset_peak(device)
        times = [timed(run, device) for _ in range(s.repeats)]
        generated = sum(len(hyps[0].tokens) for hyps in out)
        if generated != s.gen_batch * (s.gen_len + 1):  # gen_len tokens + eos per sample
            raise RuntimeError(f"{label} decoded {generated} tokens, expected {s.gen_batch * (s.gen_len + 1)}")
        med = statistics.median(times)
        rows.append(Row("generate", f"{arch}{' tiny' if s.tiny else ''} {MODEL_DTYPE} {label}, "
                                    f"{s.gen_batch} x {s.gen_len} tokens",
                        seconds=med, tokens_per_s=s.gen_batch * s.gen_len / med, peak_gib=peak_gib(device),
                        note=f"{s.gen_len / med:.1f} decoder steps/s", extra={"times": times}))
    return rows


def generation_rows(s: Settings, device, dtype) -> list[Row]:
    import torch

    rows: list[Row] = []
    for arch in s.archs:
        try:
            rows += generation_rows_for(s, arch, device, dtype)
        except Exception as e:
            rows.append(failed("generate", f"{arch} {MODEL_DTYPE}", e))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------- the table
def _fmt(value: Optional[float], width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{decimals}f}"


def format_table(rows: list[Row]) -> str:
    width = max([len(r.config) for r in rows] + [13])
    head = f"{'check':<11} {'configuration':<{width}} {'status':<6} {'time s':>8} {'tokens/s':>10} {'MFU':>6} " \
           f"{'peak GiB':>8}  notes"
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        lines.append(f"{r.check:<11} {r.config:<{width}} {'ok' if r.ok else 'FAILED':<6} {_fmt(r.seconds, 8, 3)} "
                     f"{_fmt(r.tokens_per_s, 10, 0)} {mfu:>6} {_fmt(r.peak_gib, 8, 2)}  {r.note}")
    return "\n".join(lines)


def environment_line(s: Settings) -> str:
    import torch

    where = torch.cuda.get_device_name(torch.device(s.device)) if s.cuda else f"CPU ({os.cpu_count()} cores)"
    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception:  # the model checks do not need DeepSpeed; the trainer rows will say if it is missing
        ds = "not importable"
    return (f"{where}; torch {torch.__version__}, CUDA {torch.version.cuda}, deepspeed {ds}; trainer "
            f"{s.train_precision}, model checks {MODEL_DTYPE}{'; --tiny sizes' if s.tiny else ''}; "
            f"peak {peak_tflops(s) or '-'} TFLOP/s")


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default; the GPU check) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: every code path, CPU-sized")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--archs", default=None, help="presets for the model-step and generation checks "
                                                 "(default ofa_base,ofa_large)")
    p.add_argument("--image-size", type=int, default=None, help="model step / generation images (default 384)")
    p.add_argument("--batch", type=int, default=None, help="model-step batch (default 8)")
    p.add_argument("--src-len", type=int, default=None, help="source tokens (default 64)")
    p.add_argument("--tgt-len", type=int, default=None, help="target tokens of the model step (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    p.add_argument("--train-steps", type=int, default=None, help="trainer steps (default 20)")
    p.add_argument("--train-timeout", type=int, default=900, help="seconds allowed per trainer run")
    p.add_argument("--gen-len", type=int, default=None, help="tokens generated per sample (default 20)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default from the GPU name)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    return p


def check_request(args) -> list[str]:
    """The checks to run; a request this machine cannot serve ends in one sentence (UserError)."""
    from ofa_scale.errors import UserError

    checks = [c for c in args.checks.split(",") if c]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        raise UserError(f"--checks {args.checks!r} names no known check; choose from {', '.join(CHECKS)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} was asked for but this machine has no usable CUDA device "
                            f"(torch.cuda.is_available() is False); run `--device cpu --tiny` for the CPU dry run")
    elif args.device != "cpu":
        raise UserError(f"--device {args.device!r} is not supported; use cuda or cpu")
    elif not args.tiny:
        raise UserError("the full-size check needs a CUDA GPU; on CPU run the dry run with --device cpu --tiny")
    for flag in ("image_size", "batch", "src_len", "tgt_len", "repeats", "train_steps", "gen_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, not {value}")
    return checks


def main(argv: list[str] | None = None) -> int:
    from ofa_scale.cli import run_cli

    args = build_parser().parse_args(argv)

    def go() -> int:
        checks = check_request(args)
        import torch

        s = settings_from_args(args)
        device = torch.device(s.device)
        dtype = torch.bfloat16
        if not s.cuda:
            torch.set_num_threads(min(2, os.cpu_count() or 1))
        print(environment_line(s), flush=True)
        rows: list[Row] = []
        with tempfile.TemporaryDirectory(prefix="ofa_gpu_check_") as tmp:
            if "trainer" in checks:
                rows += trainer_rows(s, Path(tmp))
            if "step" in checks:
                rows += step_rows(s, device, dtype)
            if "generate" in checks:
                rows += generation_rows(s, device, dtype)
        print(format_table(rows))
        print("time s: median step (trainer: optimizer step; model step: forward + backward; generate: one batch); "
              "MFU against the dense peak above")
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
        return 0 if all(r.ok for r in rows) else 1

    return run_cli(go, "gpu_check")


if __name__ == "__main__":
    sys.exit(main())

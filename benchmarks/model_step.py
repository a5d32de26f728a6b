"""Training-step benchmark of the OFA model: forward + backward, math vs fused (SDPA) attention, eager vs compiled
(`train.compile`: per-block torch.compile) and channels-last stem (`train.channels_last`), side by side.

CPU (default): ofa_tiny, batch 8, 256×256 images, 30 source and 20 target tokens, 2 threads.
    python benchmarks/model_step.py
    python benchmarks/model_step.py --impls sdpa --variants eager,channels-last,compiled,compiled+channels-last
GPU: python benchmarks/model_step.py --device cuda --arch ofa_base,ofa_large --dtype bf16

Timing: every (attention path, variant) is run interleaved (math/eager, sdpa/eager, math/compiled, …) after
warm-up, so machine noise hits all alike; the table shows medians and the ratio to the eager step of the same
attention path. On a shared CPU machine, `--threads 1 --clock cpu` times each step in this process's CPU seconds,
which other processes barely change (under heavy load, wall-clock ratios depend on how each variant's threads
happen to be scheduled). The `compiled-transformer`/`compiled-stem` variants compile only that part of the model.
Each variant is its own model built from the same seed. Compile time is reported separately: the first step of a
compiled variant (tracing + code generation + the step) minus its median step; the inductor
caches on disk make a second run of the same shapes compile faster. Tokens/s counts every token the transformer
processes: batch × (image tokens + source + target). MFU = analytic FLOPs of the step (ofa_scale.model.flops:
transformer matmuls + attention + ResNet convolutions, backward = 2× forward) / time / the device's dense peak
(--peak-tflops; default from the GPU name: H100/H200 989 bf16 TFLOP/s, A100 312).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from ofa_scale.model import OFAConfig, OFAModel, kernels
from ofa_scale.model.flops import step_flops
from ofa_scale.parallel.compile import compile_model

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# variant -> (train.compile, train.channels_last, compile scope); the scoped ones tell apart what compiling the
# transformer layers and the stem's blocks each contribute
VARIANTS = {"eager": (False, False, "all"), "channels-last": (False, True, "all"), "compiled": (True, False, "all"),
            "compiled+channels-last": (True, True, "all"),
            "compiled-transformer": (True, False, "transformer"),
            "compiled-transformer+channels-last": (True, True, "transformer"),
            "compiled-stem+channels-last": (True, True, "stem")}


def make_batch(args, device, dtype, generator):
    b = args.batch
    return dict(
        src_tokens=torch.randint(4, 50000, (b, args.src_len), generator=generator).to(device),
        patch_images=torch.randn(b, 3, args.image_size, args.image_size, generator=generator).to(device, dtype),
        patch_masks=torch.ones(b, dtype=torch.bool, device=device),
        prev_output_tokens=torch.randint(4, 50000, (b, args.tgt_len), generator=generator).to(device),
    ), torch.randint(4, 50000, (b, args.tgt_len), generator=generator).to(device)


def train_step(model, batch, target, device):
    logits = model(**batch)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), target.view(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(cfg, device, dtype, variant: str) -> OFAModel:
    torch.manual_seed(0)  # every variant starts from the same weights
    model = OFAModel(cfg).to(device=device, dtype=dtype).train()
    compiled, channels_last, scope = VARIANTS[variant]
    if compiled or channels_last:
        compile_model(model, compile=compiled, channels_last=channels_last, scope=scope)
    return model


def timed_step(model, impl, batch, target, device, clock=time.perf_counter) -> float:
    model.set_attention_impl(impl)
    start = clock()
    train_step(model, batch, target, device)
    return clock() - start


def peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value if args.dtype != "fp32" else None
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default=None, help="comma-separated presets (default ofa_tiny on CPU)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--src-len", type=int, default=30)
    p.add_argument("--tgt-len", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default="math,sdpa")
    p.add_argument("--variants", default="eager,compiled",
                   help=f"comma-separated, from {', '.join(VARIANTS)}; ratios are to 'eager' when it is listed")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU seconds (all its threads), which other processes on a shared "
                        "machine barely change; most telling with --threads 1 (CPU only; compile s then leaves "
                        "out inductor's compile workers)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        p.error("--clock cpu measures CPU time; use the wall clock on an accelerator")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    archs = (args.arch or "ofa_tiny").split(",")
    impls = args.impls.split(",")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    peak = peak_tflops(args, device)
    kernels.describe(verbose=True)
    print(f"device={device} dtype={dtype} batch={args.batch} image={args.image_size} src={args.src_len} "
          f"tgt={args.tgt_len} threads={args.threads} warmup={args.warmup} repeats={args.repeats} clock={args.clock}")

    rows = []
    for arch in archs:
        cfg = OFAConfig.preset(arch)
        models = {v: build_model(cfg, device, dtype, v) for v in variants}
        batch, target = make_batch(args, device, dtype, torch.Generator().manual_seed(0))
        flops = step_flops(cfg, args.batch, args.src_len, args.tgt_len, args.image_size)
        n_img = (args.image_size // 16) ** 2
        tokens = args.batch * (n_img + args.src_len + args.tgt_len)
        runs = [(impl, v) for v in variants for impl in impls]
        first: dict[tuple[str, str], float] = {}
        times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
        for impl, v in runs:  # warm-up each path (compilation, allocator, kernel selection)
            first[(impl, v)] = timed_step(models[v], impl, batch, target, device, clock)
            for _ in range(args.warmup - 1):
                timed_step(models[v], impl, batch, target, device, clock)
        for _ in range(args.repeats):
            for impl, v in runs:
                times[(impl, v)].append(timed_step(models[v], impl, batch, target, device, clock))
        for impl, v in runs:
            med = statistics.median(times[(impl, v)])
            base_variant = "eager" if "eager" in variants else variants[0]
            base = statistics.median(times[(impl, base_variant)])
            tflops = flops.train_step / med / 1e12
            compile_s = first[(impl, v)] - med if VARIANTS[v][0] else None
            rows.append((arch, impl, v, str(dtype).replace("torch.", ""), med, min(times[(impl, v)]), tokens / med,
                         tflops, (tflops / peak) if peak else None, med / base, compile_s))
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = f"{'arch':<11} {'attention':<9} {'variant':<34} {'dtype':<8} {'median s':>9} {'min s':>7} " \
             f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'ratio':>6} {'compile s':>9}"
    print(header)
    print("-" * len(header))
    for arch, impl, v, dt, med, fastest, tps, tf, mfu, ratio, compile_s in rows:
        mfu_s = f"{100 * mfu:5.1f}%" if mfu is not None else "   n/a"
        comp = f"{compile_s:9.1f}" if compile_s is not None else f"{'-':>9}"
        print(f"{arch:<11} {impl:<9} {v:<34} {dt:<8} {med:9.3f} {fastest:7.3f} {tps:10.0f} {tf:8.3f} {mfu_s:>6} "
              f"{ratio:6.2f} {comp}")
    base_name = "eager" if "eager" in variants else variants[0]
    print(f"(ratio = median / median of '{base_name}' for the same arch and attention; compile s = first step - "
          f"median step, i.e. tracing and code generation; tokens/s, TFLOP/s and MFU use the median; min s shows "
          f"how much of the spread is machine noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

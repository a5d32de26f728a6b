"""Training-step benchmark of the OFA model: forward + backward, math vs fused (SDPA) attention, side by side.

CPU (default): ofa_tiny, batch 8, 256×256 images, 30 source and 20 target tokens, 2 threads.
    python benchmarks/model_step.py
GPU: python benchmarks/model_step.py --device cuda --arch ofa_base,ofa_large --dtype bf16

Timing: the two attention paths are run interleaved (math, sdpa, math, sdpa, …) after warm-up, so machine noise
hits both alike; the table shows medians and the sdpa/math ratio. Tokens/s counts every token the transformer
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

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    archs = (args.arch or "ofa_tiny").split(",")
    impls = args.impls.split(",")
    peak = peak_tflops(args, device)
    kernels.describe(verbose=True)
    print(f"device={device} dtype={dtype} batch={args.batch} image={args.image_size} src={args.src_len} "
          f"tgt={args.tgt_len} threads={args.threads} warmup={args.warmup} repeats={args.repeats}")

    rows = []
    for arch in archs:
        torch.manual_seed(0)
        cfg = OFAConfig.preset(arch)
        model = OFAModel(cfg).to(device=device, dtype=dtype).train()
        batch, target = make_batch(args, device, dtype, torch.Generator().manual_seed(0))
        flops = step_flops(cfg, args.batch, args.src_len, args.tgt_len, args.image_size)
        n_img = (args.image_size // 16) ** 2
        tokens = args.batch * (n_img + args.src_len + args.tgt_len)
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for impl in impls:  # warm-up each path (allocator, kernel selection)
            model.set_attention_impl(impl)
            for _ in range(args.warmup):
                train_step(model, batch, target, device)
        for _ in range(args.repeats):
            for impl in impls:
                model.set_attention_impl(impl)
                start = time.perf_counter()
                train_step(model, batch, target, device)
                times[impl].append(time.perf_counter() - start)
        base = statistics.median(times[impls[0]])
        for impl in impls:
            med = statistics.median(times[impl])
            tflops = flops.train_step / med / 1e12
            rows.append((arch, impl, str(dtype).replace("torch.", ""), med, min(times[impl]), tokens / med, tflops,
                         (tflops / peak) if peak else None, med / base))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = f"{'arch':<11} {'attention':<9} {'dtype':<8} {'median s':>9} {'min s':>7} {'tokens/s':>10} " \
             f"{'TFLOP/s':>8} {'MFU':>6} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for arch, impl, dt, med, fastest, tps, tf, mfu, ratio in rows:
        mfu_s = f"{100 * mfu:5.1f}%" if mfu is not None else "   n/a"
        print(f"{arch:<11} {impl:<9} {dt:<8} {med:9.3f} {fastest:7.3f} {tps:10.0f} {tf:8.3f} {mfu_s:>6} {ratio:6.2f}")
    print(f"(ratio = median / median of '{impls[0]}' for the same arch; tokens/s, TFLOP/s and MFU use the median; "
          f"min s shows how much of the spread is machine noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

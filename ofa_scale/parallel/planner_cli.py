"""`ofa-plan`: print feasible tp × pp × dp × ZeRO layouts for an OFA size on a cluster, ranked by step time.

    ofa-plan --arch ofa_huge --gpus 512 --gpu-mem-gb 80 --tflops 400 --global-batch 4096 --image-size 480
    ofa-plan --layers 24 --hidden 2048 --heads 32 --ffn 8192 --gpus 64 --global-batch 1024

The memory and time model is documented in ofa_scale/parallel/planner.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from ofa_scale.cli import run_cli
from ofa_scale.errors import ConfigError
from ofa_scale.model.config import OFAConfig
from ofa_scale.parallel.planner import ARCHS, Hardware, Workload, enumerate_plans, mfu, total_params


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ofa-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), help="a preset (ofa_10b is a planning-only 10B-class size)")
    p.add_argument("--layers", type=int, help="custom size: encoder layers (decoder = half unless --dec-layers)")
    p.add_argument("--dec-layers", type=int, help="custom size: decoder layers")
    p.add_argument("--hidden", type=int, help="custom size: model width d")
    p.add_argument("--heads", type=int, help="custom size: attention heads")
    p.add_argument("--ffn", type=int, help="custom size: FFN width (default 4 x hidden)")
    p.add_argument("--resnet", default="resnet152", choices=["resnet50", "resnet101", "resnet152"])
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0)
    p.add_argument("--tflops", type=float, default=400.0, help="achievable TFLOP/s per GPU")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-node-gbs", type=float, default=300.0, help="per-GPU NVLink bandwidth, GB/s")
    p.add_argument("--inter-node-gbs", type=float, default=50.0, help="per-GPU network bandwidth, GB/s")
    p.add_argument("--global-batch", type=int, required=True, help="samples per optimizer step")
    p.add_argument("--image-size", type=int, default=480)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--top", type=int, default=10, help="rows to print (0 = all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


# Flags that must be >= 1 (counts, sizes) and > 0 and finite (rates, capacities); --top may be 0 (= all rows).
POSITIVE_INTS = ("gpus", "global_batch", "gpus_per_node", "image_size", "src_len", "tgt_len", "layers", "dec_layers",
                 "hidden", "heads", "ffn")
POSITIVE_FLOATS = ("gpu_mem_gb", "tflops", "intra_node_gbs", "inter_node_gbs")


def check_numbers(args) -> None:
    """Refuse a negative, zero or non-finite number up front: the planner would otherwise divide by it or rank
    layouts by NaN step times and print them as if they were predictions."""
    for dest in POSITIVE_INTS:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ConfigError(f"--{dest.replace('_', '-')} must be a positive integer, not {value}")
    for dest in POSITIVE_FLOATS:
        value = getattr(args, dest)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{dest.replace('_', '-')} must be a positive finite number, not {value:g}")
    if args.top < 0:
        raise ConfigError(f"--top must be 0 (all rows) or a positive number of rows, not {args.top}")


def arch_from_args(args) -> tuple[str, OFAConfig]:
    custom = [args.layers, args.hidden, args.heads]
    if args.arch and any(v is not None for v in custom + [args.ffn, args.dec_layers]):
        raise ConfigError("give either --arch or the custom size flags (--layers --hidden --heads [--ffn]), not both")
    if args.arch:
        return args.arch, ARCHS[args.arch]
    if any(v is None for v in custom):
        raise ConfigError("name a preset with --arch, or give a custom size with --layers, --hidden and --heads")
    if args.hidden % args.heads:
        raise ConfigError(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    dec = args.dec_layers if args.dec_layers is not None else max(1, args.layers // 2)
    spec = OFAConfig(arch="custom", d_model=args.hidden, ffn_dim=args.ffn or 4 * args.hidden, heads=args.heads,
                     encoder_layers=args.layers, decoder_layers=dec, resnet=args.resnet)
    spec.validate()
    return f"custom d={args.hidden} L={args.layers}+{dec}", spec


def format_table(plans, arch, w, hw, top: int) -> str:
    head = ("rank  tp pp   dp ZeRO ckpt  mb x m   stages        params/GPU | params grads optim  act(ckpt/none)  buf"
            "  total GB | step s  comp  bubble  TP    PP    DP  | MFU*")
    lines = [head, "-" * len(head)]
    for i, p in enumerate(plans[: top or None], 1):
        stages = "/".join(map(str, p.stage_layers)) if p.pp > 1 else "-"
        lines.append(
            f"{i:>4} {p.tp:>3} {p.pp:>2} {p.dp:>4} {p.zero:>4} {'yes' if p.checkpointing else 'no':>4} "
            f"{p.micro_batch:>3} x {p.micro_batches:<3} {stages:<13} {p.params_per_gpu / 1e6:>9.1f}M | "
            f"{p.mem_params_gb:>6.1f} {p.mem_grads_gb:>5.1f} {p.mem_optimizer_gb:>5.1f} "
            f"{p.mem_activations_ckpt_gb:>6.1f}/{p.mem_activations_no_ckpt_gb:<7.1f} {p.mem_buffers_gb:>4.1f} "
            f"{p.mem_total_gb:>7.1f} | {p.step_time:>6.3f} {p.t_compute:>5.3f} {p.t_bubble:>6.3f} {p.t_tp:>5.3f} "
            f"{p.t_pp:>5.3f} {p.t_dp:>5.3f} | {mfu(p, arch, w, hw):>4.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        check_numbers(args)
        name, arch = arch_from_args(args)
        hw = Hardware(args.gpus, args.gpu_mem_gb, args.tflops, args.gpus_per_node, args.intra_node_gbs,
                      args.inter_node_gbs)
        w = Workload(args.global_batch, args.image_size, args.src_len, args.tgt_len, args.precision)
        plans = enumerate_plans(arch, w, hw)
        if args.json:
            print(json.dumps({"arch": name, "params": total_params(arch), "plans": [
                {**p.to_dict(), "mfu": mfu(p, arch, w, hw)} for p in plans[: args.top or None]]}, indent=1))
            return 0 if plans else 1
        print(f"{name}: {total_params(arch) / 1e9:.2f}B parameters; {args.gpus} GPUs x {args.gpu_mem_gb:g} GB, "
              f"{args.tflops:g} TFLOP/s; global batch {args.global_batch}, image {args.image_size}px "
              f"({w.image_tokens} patches), text {args.src_len}/{args.tgt_len}, {args.precision}")
        if not plans:
            print(f"no layout fits in {args.gpu_mem_gb:g} GB per GPU: use more GPUs, a smaller global batch "
                  f"or a smaller image size", file=sys.stderr)
            return 1
        print(format_table(plans, arch, w, hw, args.top))
        print("memory in GiB per GPU (act: with/without activation checkpointing; total uses the row's choice); "
              "time in s per step; *MFU relative to --tflops")
        return 0

    return run_cli(go, "ofa-plan")


if __name__ == "__main__":
    sys.exit(main())

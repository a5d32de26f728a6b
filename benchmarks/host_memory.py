"""Peak host memory per rank of a short `ofa-train` run, for 1 and 2 processes (issue: models that never sit whole
on one rank).

    python benchmarks/host_memory.py --data DIR --tokenizer DIR [--arch ofa_base ofa_large] [--ranks 1 2]
        [--zero 3 2] [--repo PATH ...] [--template JSON ...]

Each rank runs under `/usr/bin/time`, so the figure is the kernel's peak RSS of that process, whatever the code
being measured reports itself (`--repo` measures another checkout with the same virtualenv, e.g. the previous
commit; `--template` measures DeepSpeed templates side by side, e.g. a copy of the old `ds_configs/zero3.json`
against the current one; `default` is the checkout's own template). Activations are kept negligible — image-text
rows only, micro-batch 2, 64-px images, no loader workers — so the peak is the model states plus what the framework
adds. The table gives the largest and smallest rank's peak, the model states' size (fp32 weights + gradients + two
Adam moments) and their ratio, how far n ranks are above 1/n of the 1-rank peak (the goal: a fixed overhead, about
the ~0.8 GiB a process holds after its imports), and what the memory costs in time: the CPU seconds (user + system,
all ranks, start-up included) and the median step time (wall clock, so only comparable on a quiet machine).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def config(arch: str, data: str, tokenizer: str, zero: int, template: str | None) -> dict:
    cfg = {
        "model": {"arch": arch},
        "data": {"root": data, "tokenizer": {"kind": "sentencepiece", "path": tokenizer}, "num_workers": 0,
                 "shuffle_buffer": 4},
        "objectives": {"mix": {"vl": 1, "text": 0, "image": 0, "detection": 0}, "random_augment": False,
                       "sample_patch_num": 0, "vl": {"image_size": 64, "source_length": 40, "target_length": 16}},
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "ckpt_interval": 1000},
        "parallel": {"zero_stage": zero},
        "logging": {"mlflow": False},
    }
    if template is not None:
        cfg["deepspeed"] = {"template": str(Path(template).resolve())}
    return cfg


def measure(repo: Path, cfg: dict, ranks: int, work: Path) -> tuple[list[float], float, float]:
    """(peak RSS GiB per rank, CPU seconds of all ranks, median step seconds)."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    wrapper = (f'exec /usr/bin/time -f "%M %U %S" -o {work}/rss_${{LOCAL_RANK:-0}} {sys.executable} '
               f'-m ofa_scale.train --config {path} --run-dir {work}/run')
    if ranks == 1:
        cmd = ["bash", "-c", wrapper]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(29500 + os.getpid() % 1000), "--no-python", "bash", "-c", wrapper]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    peaks, cpu = [], 0.0
    for r in range(ranks):
        kib, user, system = (work / f"rss_{r}").read_text().split()[-3:]
        peaks.append(int(kib) / (1 << 20))
        cpu += float(user) + float(system)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return peaks, cpu, statistics.median(r["step_time_s"] for r in records)


def model_state_gib(arch: str, vocab: int) -> float:
    from ofa_scale.model.config import OFAConfig
    from ofa_scale.parallel.planner import total_params

    return total_params(OFAConfig.preset(arch, vocab_size=vocab)) * 16 / (1 << 30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--arch", nargs="+", default=["ofa_base"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--zero", type=int, nargs="+", default=[3], help="ZeRO stages to measure, each its own rows")
    p.add_argument("--repo", nargs="+", default=[str(REPO)], help="checkouts to measure (labelled by path)")
    p.add_argument("--template", nargs="+", default=["default"],
                   help="DeepSpeed templates to measure (labelled by file name); 'default' = the checkout's own")
    args = p.parse_args()
    from ofa_scale.data.tokenizer import load_tokenizer

    vocab = len(load_tokenizer("sentencepiece", args.tokenizer))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            states = model_state_gib(arch, vocab)
            for zero, repo, template in itertools.product(args.zero, args.repo, args.template):
                label = Path(repo).name if template == "default" else f"{Path(repo).name}:{Path(template).stem}"
                cfg = config(arch, args.data, args.tokenizer, zero, None if template == "default" else template)
                for ranks in args.ranks:
                    work = Path(tmp) / f"{arch}-z{zero}-{label.replace(':', '-')}-{ranks}"
                    peaks, cpu, step = measure(Path(repo), cfg, ranks, work)
                    rows.append((arch, zero, label, ranks, max(peaks), min(peaks), states, cpu, step))
                    print(f"measured {rows[-1]}", file=sys.stderr, flush=True)
    print("| model | ZeRO | checkout | ranks | peak RSS, largest rank GiB | smallest rank GiB | "
          "model states GiB (1 rank) | largest / states | vs 1 rank | above 1 rank / ranks GiB | CPU s, all ranks | "
          "median step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    one = {}
    for arch, zero, repo, ranks, hi, lo, states, cpu, step in rows:
        if ranks == 1:
            one[(arch, zero, repo)] = hi
        single = one.get((arch, zero, repo), float("nan"))
        # the goal for n ranks: the 1-rank peak / n plus a fixed overhead (imports, buffers every rank holds)
        print(f"| {arch} | {zero} | {repo} | {ranks} | {hi:.2f} | {lo:.2f} | {states:.2f} | {hi / states:.2f} | "
              f"{hi / single:.2f} | {hi - single / ranks:.2f} | {cpu:.0f} | {step:.2f} |")


if __name__ == "__main__":
    main()

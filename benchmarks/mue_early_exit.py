"""MuE early exit (model/early_exit.py) against the full model: layers run, wall time and the metric, side by side.

For caption (beam search, the recipe's decoding) and VQA (beam search over the answer trie, so the decoder exits
too; the recipe's all-candidate scorer exits only in the encoder), on held-out synthetic data from
`ofa-preprocess sample` (made in --work once, as scripts/demo_finetune.sh makes its held-out splits):

    python benchmarks/mue_early_exit.py --model runs/demo                 # a trained run (metric delta meaningful)
    python benchmarks/mue_early_exit.py --thresholds 0.99,0.95,0.9 --repeats 3
    python benchmarks/mue_early_exit.py                                   # random ofa_tiny (speed only)

Each cell: the full model (a threshold of 1: never exits, bit-identical to exits off) and each threshold, run
interleaved `--repeats` times over the same items after a warm-up round (each round starting with the next
setting). Ratios are exit / full:
* encoder / decoder layers: mean layers run per encoder sample / decoder row-step over the stack's depth;
* decoder steps: beam rows × steps decoded — exits that change the outputs change their lengths, and the time
  follows that as much as the layers;
* wall time: median seconds of the whole evaluation (encoder, decoding, the task's post-processing); CPU time:
  this process's CPU seconds, steadier than wall time on a machine shared with other jobs.
Δ metric = exit − full (caption CIDEr-D, VQA score); "same prediction" = the share of items predicted exactly as
the full model does (a quality check that also means something for a weak or random model).
The threshold applies to encoder and decoder alike, with MuE's decoder schedule (no exit in the first third of
the steps); `--early-exit-extra` appends keys, e.g. kv_fill=hidden.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ofa_scale.finetune.evaluate import evaluate
from ofa_scale.finetune.task import make_task
from ofa_scale.model import early_exit
from ofa_scale.model.early_exit import EarlyExitConfig
from ofa_scale.training.config import load_training_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # name -> (recipe, test split TSV, metric, extra overrides)
    "caption": ("caption_stage1_base", "caption_test.tsv", "cider", []),
    "vqa": ("vqa_base", "vqa_test.tsv", "vqa_score", ["task.decoding.inference=beam"]),
}


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)


def make_data(work: Path, images: int) -> Path:
    """Held-out caption/VQA shards and the VQA answer file (once per --work directory)."""
    data = work / "data"
    if (data / "vqa_answers.txt").is_file():
        return data
    tsv = data / "corpus" / "finetune"
    sh("ofa_scale.cli.preprocess", "sample", "--out", str(data / "corpus"), "--rows", "1", "--seed", "0",
       "--finetune-images", "32", "--finetune-eval-images", str(images))
    for name in ("caption_test", "vqa_test"):
        sh("ofa_scale.cli.preprocess", "shards", "--format", name.split("_")[0], "--input", str(tsv / f"{name}.tsv"),
           "--out", str(data / name), "--no-progress")
    sh("ofa_scale.cli.preprocess", "vqa-answers", "--input", str(tsv / "vqa_train.tsv"),
       "--out", str(data / "vqa_answers.txt"))
    return data


def load(args, recipe: str, overrides: list[str]):
    """(training config, EvalModel) of the trained --model, or a random ofa_tiny with the demo's tokenizer."""
    from ofa_scale.finetune.eval_cli import _load

    cfg = load_training_config(ROOT / "configs" / "finetune" / f"{recipe}.yaml", overrides)
    if args.model:
        return cfg, _load(args.model, cfg, use_ema=True)
    from ofa_scale.data.tokenizer import load_tokenizer
    from ofa_scale.evaluation.model_source import EvalModel
    from ofa_scale.model import OFAConfig, OFAModel

    tok = load_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path)
    torch.manual_seed(0)
    model = OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=len(tok))).eval()
    return cfg, EvalModel(model, tok, None, {"checkpoint": "random ofa_tiny"})


def run_task(args, name: str, data: Path, thresholds: list[float], device, dtype) -> list[dict]:
    recipe, _, metric, extra = TASKS[name]
    overrides = [f"task.image_size={args.image_size}", "precision=fp32", *extra, *args.set]
    if name == "vqa":
        overrides.append(f"task.answers={data / 'vqa_answers.txt'}")
    # a run dir carries its own tokenizer (these are then unused); a random model or a model dir uses --tokenizer
    overrides += ["data.tokenizer.kind=sentencepiece", f"data.tokenizer.path={args.tokenizer}"]
    cfg, loaded = load(args, recipe, overrides)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    task = make_task(cfg.task, loaded.tokenizer)
    shards = data / f"{name}_test"
    # the full model: a threshold of 1 never exits (bit-identical to exits off, tests/model/test_early_exit.py) and
    # still counts the decoder row-steps, which differ when exits change the outputs' lengths
    settings: list[EarlyExitConfig] = [EarlyExitConfig(encoder=1.0, decoder=1.0)]
    for t in thresholds:
        spec = f"encoder={t},decoder={t}" + (f",{args.early_exit_extra}" if args.early_exit_extra else "")
        settings.append(EarlyExitConfig.parse(spec))
    seconds: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    cpu: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    metrics: dict[int, float] = {}
    predictions: dict[int, list] = {}
    stats: dict[int, early_exit.ExitStats] = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        # each round starts with another setting, so none pays a round's first-call costs every time
        for i in [(rep + k) % len(settings) for k in range(len(settings))]:
            exits = settings[i]
            exits.stats = early_exit.ExitStats()
            early_exit.enable(model, exits)
            start, start_cpu = time.perf_counter(), time.process_time()
            result = evaluate(task, model, shards, device=device, dtype=dtype, limit=args.limit, final=False)
            if rep:
                seconds[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)
            metrics[i] = result.metrics[metric]
            predictions[i] = [{k: v for k, v in p.items() if k != "id"} for p in result.predictions]
            stats[i] = exits.stats
    early_exit.enable(model, None)
    full_time, full_cpu = statistics.median(seconds[0]), statistics.median(cpu[0])
    rows = []
    for i, t in enumerate(thresholds, start=1):
        same = sum(a == b for a, b in zip(predictions[0], predictions[i])) / max(len(predictions[0]), 1)
        rows.append(dict(task=name, threshold=t, metric=metric, samples=result.samples,
                         enc=stats[i].summary()["encoder_layers_fraction"],
                         dec=stats[i].summary()["decoder_layers_fraction"],
                         steps=stats[i].decoder_row_steps / stats[0].decoder_row_steps,
                         time=statistics.median(seconds[i]) / full_time, full_s=full_time,
                         full_range=(min(seconds[0]), max(seconds[0])),
                         cpu=statistics.median(cpu[i]) / full_cpu,
                         full=metrics[0], exit=metrics[i], same=same))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="trained run dir / model dir / OFA .pt (default: random ofa_tiny)")
    p.add_argument("--tokenizer", default=str(ROOT / "runs" / "demo" / "data" / "tokenizer"),
                   help="sentencepiece tokenizer dir for a random model or a model dir (a run carries its own)")
    p.add_argument("--thresholds", default="0.99,0.95,0.9")
    p.add_argument("--tasks", default="caption,vqa")
    p.add_argument("--early-exit-extra", default="", help="extra --early-exit keys, e.g. kv_fill=hidden")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="items per task (0 = the whole held-out split)")
    p.add_argument("--images", type=int, default=48, help="held-out images made per split")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--work", default="/tmp/ofa_mue_bench", help="where the sample data is made (reused)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    data = make_data(Path(args.work), args.images)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = []
    for name in args.tasks.split(","):
        rows += run_task(args, name, data, thresholds, device, dtype)
    fill = EarlyExitConfig.parse("1" if not args.early_exit_extra else f"encoder=1,{args.early_exit_extra}").kv_fill
    print(f"model: {args.model or 'random ofa_tiny'}; device {device} {args.dtype}, {args.threads} threads; "
          f"{args.repeats} repeats (medians); image {args.image_size}px; kv_fill={fill}")
    print("| task | τ | samples | encoder layers | decoder layers | decoder steps | wall time | CPU time "
          "| full s (min–max) | metric full | metric exit | Δ metric | same prediction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["full_range"]
        print(f"| {r['task']} | {r['threshold']} | {r['samples']} | {r['enc']:.2f}× | {r['dec']:.2f}× | "
              f"{r['steps']:.2f}× | {r['time']:.2f}× | {r['cpu']:.2f}× | {r['full_s']:.2f} ({low:.2f}–{high:.2f}) "
              f"| {r['metric']} {r['full']:.4f} | {r['exit']:.4f} | {r['exit'] - r['full']:+.4f} | {r['same']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MuE early exit (model/early_exit.py) against the full model: layers run, wall time and the metric, side by side.

By default it first finetunes tiny models on `ofa-preprocess sample`'s synthetic data (the demo's small OFA from
`make demo`, 64-px images, one process): each task with its MuE recipe (configs/finetune/*_mue.yaml: the
modality-decomposed encoder, the loss summed over every decoder layer) and, for comparison, with the ordinary
recipe under the same budget. Then every model is evaluated on the held-out test split with exits off and at each
setting:

    python benchmarks/mue_early_exit.py                                    # finetune (reused in --work), measure
    python benchmarks/mue_early_exit.py --steps 300 --thresholds 0.9,0.8 --repeats 3
    python benchmarks/mue_early_exit.py --model RUN --tasks caption        # an existing run (no finetuning)
    python benchmarks/mue_early_exit.py --size ofa_tiny --pretrained none  # OFA's ofa_tiny (4+4 layers) from scratch

Settings per model: "recipe" = the recipe's `task.early_exit`, MuE's evaluation thresholds (spec ext §10.7.4:
caption img 0.99 / txt 0.7 / decoder 0.9 with the decoder schedule; SNLI-VE img 0.7 / txt 0.99 / decoder 0.7,
no schedule in the all-candidate pass) — per-stream thresholds need the decomposed encoder, so ordinary models skip
it — and each `--thresholds` value for every stack. Runs are interleaved `--repeats` times over the same items after
a warm-up round (each round starting with the next setting). Ratios are exit / full:
* image / text / encoder / decoder layers: mean layers run per sample (decoder: per row-step) over the stack depth
  (image / text: the decomposed encoder's streams; encoder: an ordinary model's joint encoder);
* wall time: median seconds of the whole evaluation; CPU time: this process's CPU seconds (steadier on a shared
  machine).
Δ metric = exit − full (caption CIDEr-D, SNLI-VE / VQA accuracy / score); "same" = the share of items predicted
exactly as the full model does.

SNLI-VE scores every candidate. With a decoder threshold the scorer takes the decoder's own teacher-forced pass
(OFA's naive scorer, where the exits live) instead of the prefix-tree scorer, so here the full model runs that
same naive pass too: the ratios compare like with like.
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

from ofa_scale.finetune import closed_set
from ofa_scale.finetune.evaluate import evaluate
from ofa_scale.finetune.task import make_task
from ofa_scale.model import early_exit
from ofa_scale.model.early_exit import EarlyExitConfig
from ofa_scale.model.generate import score_candidates_naive
from ofa_scale.training.config import load_training_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # name -> (recipe stem, metric, extra overrides)
    "caption": ("caption_stage1_base", "cider", []),
    "snli_ve": ("snli_ve_base", "accuracy", []),
    "vqa": ("vqa_base", "vqa_score", ["task.decoding.inference=beam"]),
}
MUE_RECIPES = {"caption": "caption_stage1_base_mue", "snli_ve": "snli_ve_base_mue"}
SHARDS = {"caption": ["caption_stage1_train", "caption_val", "caption_test"],
          "snli_ve": ["snli_ve_train", "snli_ve_val", "snli_ve_test"],
          "vqa": ["vqa_train", "vqa_val", "vqa_test"]}
TRAIN_SHARDS = {"caption": "caption_stage1_train", "snli_ve": "snli_ve_train", "vqa": "vqa_train"}
# --size: the demo's small OFA (scripts/demo_finetune.sh: 2+2 layers, the default, finetuned from runs/demo), or
# OFA's ofa_tiny preset as it is (d_model 256, 4+4 layers, ResNet-50), deep enough for exits to skip most of a stack
SIZES = {"demo": ["model.arch=ofa_tiny", "model.overrides.d_model=128", "model.overrides.ffn_dim=256",
                  "model.overrides.heads=4", "model.overrides.encoder_layers=2", "model.overrides.decoder_layers=2"],
         "ofa_tiny": ["model.arch=ofa_tiny"]}
# from scratch (--pretrained none) nothing is worth keeping in the token embeddings the recipes freeze
FROM_SCRATCH = ["model.pretrained=null", "train.freeze_encoder_embedding=false", "train.freeze_decoder_embedding=false"]


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)


def make_data(work: Path, images: int, eval_images: int) -> Path:
    """Train / valid / test shards of every task and the VQA answer file (once per --work directory)."""
    data = work / "data"
    if (data / "vqa_answers.txt").is_file():
        return data
    tsv = data / "corpus" / "finetune"
    sh("ofa_scale.cli.preprocess", "sample", "--out", str(data / "corpus"), "--rows", "1", "--seed", "0",
       "--finetune-images", str(images), "--finetune-eval-images", str(eval_images))
    for task, names in SHARDS.items():
        for name in names:
            sh("ofa_scale.cli.preprocess", "shards", "--format", task, "--input", str(tsv / f"{name}.tsv"),
               "--out", str(data / name), "--no-progress")
    sh("ofa_scale.cli.preprocess", "vqa-answers", "--input", str(tsv / "vqa_train.tsv"),
       "--out", str(data / "vqa_answers.txt"))
    return data


def task_overrides(args, task: str, data: Path) -> list[str]:
    out = [f"task.image_size={args.image_size}", "data.tokenizer.kind=sentencepiece",
           f"data.tokenizer.path={args.tokenizer}", *TASKS[task][2], *args.set]
    if task == "vqa":
        out.append(f"task.answers={data / 'vqa_answers.txt'}")
    return out


def finetune(args, task: str, recipe: str, run: Path, data: Path) -> Path:
    """A brief finetune of the demo model with `recipe` (reused when `run` already finished)."""
    if (run / "checkpoints" / "latest").exists():
        return run
    valid = SHARDS[task][1]
    cmd = [sys.executable, "-m", "ofa_scale.train", "--config", str(ROOT / "configs" / "finetune" / f"{recipe}.yaml"),
           "--run-dir", str(run)]
    start_from = FROM_SCRATCH if args.pretrained == "none" else [f"model.pretrained={args.pretrained}"]
    for kv in [*SIZES[args.size], "precision=fp32", *task_overrides(args, task, data), *start_from,
               f"data.train={data / TRAIN_SHARDS[task]}", f"data.valid={data / valid}", f"train.steps={args.steps}",
               "train.epochs=50", f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
               f"optim.lr={args.lr}", "schedule.warmup_ratio=0.06", f"train.ckpt_interval={args.steps}",
               f"task.valid_interval={args.steps}", "task.valid_limit=16", "data.num_workers=1",
               "logging.mlflow=false", "objectives.drop_worst_after=100000"]:
        cmd += ["--set", kv]
    print(f"finetuning {task} with {recipe} ({args.steps} updates) -> {run}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"})
    print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return run


def settings_for(cfg, decomposed: bool, thresholds: list[float]) -> list[tuple[str, EarlyExitConfig]]:
    """(label, exits) per setting; the full model first (thresholds 1: never exits, bit-identical to exits off,
    and still counting layers)."""
    out = [("full", EarlyExitConfig())]
    if decomposed and cfg.task.early_exit:
        out.append((f"recipe {cfg.task.early_exit}", EarlyExitConfig.parse(cfg.task.early_exit)))
    out += [(f"{t}", EarlyExitConfig.parse(str(t))) for t in thresholds]
    return out


def measure(args, task: str, label: str, checkpoint: Path | str, recipe: str, data: Path,
            thresholds: list[float], device, dtype) -> list[dict]:
    from ofa_scale.finetune.eval_cli import _load

    cfg = load_training_config(ROOT / "configs" / "finetune" / f"{recipe}.yaml", task_overrides(args, task, data))
    loaded = _load(str(checkpoint), cfg, use_ema=True)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    decomposed = bool(model.config.mue)
    task_obj = make_task(cfg.task, loaded.tokenizer)
    shards = data / SHARDS[task][2]
    settings = settings_for(cfg, decomposed, thresholds)
    seconds = {i: [] for i in range(len(settings))}
    cpu = {i: [] for i in range(len(settings))}
    metrics, predictions, stats = {}, {}, {}
    metric = TASKS[task][1]
    for rep in range(args.repeats + 1):  # the first round warms up
        for i in [(rep + k) % len(settings) for k in range(len(settings))]:
            exits = settings[i][1]
            exits.stats = early_exit.ExitStats()
            early_exit.enable(model, exits)
            start, start_cpu = time.perf_counter(), time.process_time()
            result = evaluate(task_obj, model, shards, device=device, dtype=dtype, limit=args.limit, final=False)
            if rep:
                seconds[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)
            metrics[i] = result.metrics[metric]
            predictions[i] = [{k: v for k, v in p.items() if k != "id"} for p in result.predictions]
            stats[i] = exits.stats.summary()
    early_exit.enable(model, None)
    full_time, full_cpu = statistics.median(seconds[0]), statistics.median(cpu[0])
    rows = []
    for i, (setting, _) in enumerate(settings):
        same = sum(a == b for a, b in zip(predictions[0], predictions[i])) / max(len(predictions[0]), 1)
        layers = {part: stats[i].get(f"{part}_layers_fraction") for part in early_exit.PARTS}
        rows.append(dict(task=task, model=label, setting=setting, metric=metric, samples=result.samples,
                         layers=layers, time=statistics.median(seconds[i]) / full_time, full_s=full_time,
                         cpu=statistics.median(cpu[i]) / full_cpu, full=metrics[0], exit=metrics[i], same=same))
    return rows


def _naive_all_candidates(model, batch, candidates, **kw):
    """The benchmark's all-candidate scorer: OFA's naive pass for every setting (module docstring)."""
    kw.pop("rows_per_pass", None)
    return score_candidates_naive(model, batch, candidates, **kw)


def _cell(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="evaluate this run dir / model dir / .pt instead of finetuning")
    p.add_argument("--pretrained", default=str(ROOT / "runs" / "demo"),
                   help="what the finetunes start from (a run / model dir of --size's shape), or none: from scratch")
    p.add_argument("--size", default="demo", choices=sorted(SIZES),
                   help="the finetuned model: demo (2+2 layers, d_model 128) or ofa_tiny (4+4, d_model 256)")
    p.add_argument("--tokenizer", default=str(ROOT / "runs" / "demo" / "data" / "tokenizer"),
                   help="sentencepiece tokenizer dir (the demo's)")
    p.add_argument("--tasks", default="caption,snli_ve")
    p.add_argument("--variants", default="mue,plain",
                   help="finetunes per task: mue (the *_mue recipe) and/or plain (the ordinary recipe)")
    p.add_argument("--thresholds", default="0.9,0.8", help="single thresholds for every stack, besides the recipe's")
    p.add_argument("--steps", type=int, default=200, help="finetuning updates")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="items per task (0 = the whole held-out split)")
    p.add_argument("--images", type=int, default=192, help="training images made")
    p.add_argument("--eval-images", type=int, default=48, help="held-out images made per split")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--work", default="/tmp/ofa_mue_bench", help="where the sample data and the runs go (reused)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    work = Path(args.work)
    data = make_data(work, args.images, args.eval_images)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    closed_set.score_candidates = _naive_all_candidates
    rows = []
    for task in args.tasks.split(","):
        if args.model:
            recipe = MUE_RECIPES.get(task, TASKS[task][0])
            rows += measure(args, task, Path(args.model).name, args.model, recipe, data, thresholds, device, dtype)
            continue
        for variant in args.variants.split(","):
            recipe = MUE_RECIPES[task] if variant == "mue" else TASKS[task][0]
            run = finetune(args, task, recipe, work / "runs" / f"{task}_{variant}", data)
            rows += measure(args, task, variant, run, recipe, data, thresholds, device, dtype)
    models = args.model or f"{args.variants} {args.size} finetunes of {args.pretrained} ({args.steps} updates)"
    print(f"models: {models}; "
          f"device {device} {args.dtype}, {args.threads} threads; {args.repeats} repeats (medians); "
          f"image {args.image_size}px")
    print("| task | model | exits | samples | image layers | text layers | encoder layers | decoder layers "
          "| wall time | CPU time | full s | metric full | metric exit | Δ metric | same |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["setting"] == "full":
            continue
        lay = r["layers"]
        print(f"| {r['task']} | {r['model']} | {r['setting']} | {r['samples']} | {_cell(lay['image'])} | "
              f"{_cell(lay['text'])} | {_cell(lay['encoder'])} | {_cell(lay['decoder'])} | {r['time']:.2f}× | "
              f"{r['cpu']:.2f}× | {r['full_s']:.2f} | {r['metric']} {r['full']:.4f} | {r['exit']:.4f} | "
              f"{r['exit'] - r['full']:+.4f} | {r['same']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

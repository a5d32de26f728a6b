"""`ofa-eval run`: evaluate a finetuned model with its recipe's task, decoding preset and test-time metrics.

    ofa-eval run --config configs/finetune/caption_stage1_base.yaml --checkpoint RUN_OR_MODEL --data SHARDS \\
        --out DIR [--set k=v]... [--early-exit THRESH | img=..,txt=..,decoder=.. | off]
    torchrun --nproc_per_node 8 -m ofa_scale.cli.evaluate run ...        (data-parallel, gathered once)

CKPT: an ofa-train run directory (its best checkpoint, else latest; EMA weights when stored — finetune/weights.py),
one of its checkpoints/step_* directories, an ofa-scale model directory or a released OFA .pt (the recipe's
tokenizer, data.tokenizer.*). Writes DIR/results.json, DIR/metrics.json and DIR/row.md (finetune/evaluate.py),
for image_gen also DIR/images/*.png and DIR/contact_sheet.png, logged to mlflow (finetune/eval_mlflow.py);
scoring is the final protocol (captions: pycocoevalcap with the PTB tokenizer and METEOR).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ofa_scale.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="RECIPE", help="the finetuning recipe YAML (task.*)")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="ofa-train run dir (or a checkpoints/step_* dir), ofa-scale model dir or OFA .pt")
    parser.add_argument("--data", required=True, metavar="SHARDS",
                        help="`ofa-preprocess shards --format <task>` output to evaluate on")
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty output directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set task.decoding.beam=1 (repeatable)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N records (0 = all)")
    parser.add_argument("--device", default=None, help="torch device (default: this rank's GPU, else cpu)")
    parser.add_argument("--label", default=None, help="the markdown row's first cell (default: the recipe name)")
    parser.add_argument("--no-ema", action="store_true", help="a run's live weights instead of its EMA weights")
    parser.add_argument("--early-exit", default=None, metavar="THRESH",
                        help="MuE early exit: one cosine threshold (e.g. 0.95) or img=0.99,txt=0.7,decoder=0.9 "
                             "(MuE's img_thres/txt_thres/decoder_thres; encoder= sets img and txt; "
                             "model/early_exit.py); default: the recipe's task.early_exit; 'off' = the full model. "
                             "metrics.json records the layers run")


def run(args: argparse.Namespace) -> int:
    import torch

    from ofa_scale.cli import require_empty_out
    from ofa_scale.finetune.evaluate import evaluate, markdown_header, summary_line, write_outputs
    from ofa_scale.finetune.task import make_task
    from ofa_scale.model import early_exit
    from ofa_scale.parallel import collectives
    from ofa_scale.training.config import load_training_config

    cfg = load_training_config(args.config, args.overrides)
    exits = early_exit.resolve(args.early_exit, cfg.task.early_exit)  # MuE: the flag, else the recipe
    if not cfg.finetuning:
        raise UserError(f"{args.config} sets no task.name; `ofa-eval run` evaluates finetuning recipes "
                        f"(configs/finetune/*.yaml)")
    if args.limit < 0:
        raise UserError("--limit must be >= 0 (0 evaluates every record)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # every rank checks (before any process group): a refusal on one rank alone would leave the others waiting
    require_empty_out(args.out)
    if not (Path(args.data) / "manifest.json").is_file():
        raise UserError(f"--data {args.data} holds no manifest.json; point it at the output of "
                        f"`ofa-preprocess shards --format {cfg.task.name}`")
    device = _device(args.device)
    if world > 1:
        collectives.init_default_group(device.type)
    loaded = _load(args.checkpoint, cfg, use_ema=not args.no_ema)
    dtype = torch.float32 if device.type == "cpu" else {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                         "fp16": torch.float16}[cfg.precision]
    model = loaded.model.to(device=device, dtype=dtype).eval()
    early_exit.use_recipe_encoder(model, cfg.model.overrides)  # a MuE recipe: the decomposed encoder
    early_exit.enable(model, exits)
    task = make_task(cfg.task, loaded.tokenizer)
    # every rank holds the whole model: forwards are not collective, so no lockstep is needed
    result = evaluate(task, model, args.data, device=device, dtype=dtype, limit=args.limit, final=True,
                      dp_rank=collectives.rank(), dp_size=collectives.world_size())
    extra = {"checkpoint": loaded.description, "data": str(Path(args.data).resolve()), "recipe": str(args.config),
             "world_size": collectives.world_size()}
    if exits is not None:  # all ranks: the layer counts are summed over them
        extra["early_exit"] = {**exits.describe(), **exits.stats.summed_over_ranks().summary()}
    if collectives.rank() == 0:
        label = args.label or Path(args.config).stem
        paths = write_outputs(args.out, task, result, label=label, extra=extra)
        if paths.get("artifacts"):  # image_gen's PNGs and contact sheet (finetune/eval_mlflow.py)
            from ofa_scale.finetune.eval_mlflow import log_evaluation

            run_id = log_evaluation(cfg, args.out, label, result.metrics, paths["artifacts"],
                                    {"checkpoint": loaded.description.get("checkpoint"), "data": extra["data"],
                                     "recipe": extra["recipe"]})
            print(f"ofa-eval run: {len(paths['artifacts'])} image files in {args.out}"
                  + (f", logged to mlflow run {run_id}" if run_id else ""))
        print(f"ofa-eval run: {task.name}: {summary_line(task, result.metrics)} ({result.samples} samples, "
              f"{result.seconds:.1f}s)")
        print(markdown_header(task))
        print(paths["row"].read_text().rstrip())
        if exits is not None:
            print(f"ofa-eval run: early exit {extra['early_exit']}")
        print(f"ofa-eval run: wrote {paths['results']}, {paths['metrics']}")
    if world > 1:
        import torch.distributed as dist

        collectives.barrier()
        dist.destroy_process_group()
    return 0


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _load(checkpoint: str, cfg, use_ema: bool):
    """An EvalModel: a run's checkpoint (its own tokenizer) or a model dir / .pt with the recipe's tokenizer."""
    from ofa_scale.evaluation.model_source import load_eval_model
    from ofa_scale.finetune.weights import load_run_eval_model, run_checkpoint

    if run_checkpoint(checkpoint) is not None:  # model.pretrained: a prompt-tuned run's copy of a moved base
        return load_run_eval_model(checkpoint, ema=use_ema, base=cfg.model.pretrained)
    return load_eval_model(checkpoint, tokenizer_kind=cfg.data.tokenizer.kind, tokenizer_path=cfg.data.tokenizer.path)

"""`ofa-train`: OFA pretraining and finetuning on a DeepSpeed engine.

    ofa-train --config configs/demo.yaml --run-dir runs/demo [--set optim.lr=1e-4 ...] [--resume]
    ofa-train --config configs/finetune/caption_stage1_base.yaml --set model.pretrained=ofa_base.pt

A config with `task.name` set is a finetuning recipe and runs the finetuning trainer (ofa_scale/finetune/).

Runs the same under `python -m ofa_scale.train`, `torchrun -m ofa_scale.train` and
`deepspeed --num_gpus N --module ofa_scale.train`. The config is loaded and validated before any process group
starts, so a bad value fails in the first second with one line naming the fix.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ofa_scale.cli import run_cli
from ofa_scale.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ofa-train", description="OFA pretraining and finetuning on DeepSpeed")
    p.add_argument("--config", required=True, help="training YAML (see configs/)")
    p.add_argument("--run-dir", default=None,
                   help="where config, metrics.jsonl, checkpoints and mlflow.db go (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoints/latest (starts fresh when there is none yet)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="checkpoint and stop after N steps of this invocation (time-sliced jobs; resume later)")
    p.add_argument("--validate-only", action="store_true", help="check the config and exit")
    p.add_argument("--check", action="store_true",
                   help="validate, build the model on the meta device under the layout, print the layout, parameters "
                        "per rank and the planner's memory estimate, and exit (no process group is started)")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --check/--validate-only: the number of processes to plan for (default: the launcher's)")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def quiet_library_warnings() -> None:
    """Silence library notices a user cannot act on (they would otherwise repeat on every step and rank)."""
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed", category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # Before anything slow (config, torch, DeepSpeed imports, the model): a preemption signal that arrives during
    # start-up is remembered and ends the run cleanly at its first step boundary instead of killing it.
    from ofa_scale.training.stop import StopRequest

    stop = StopRequest()
    quiet_library_warnings()

    def go() -> int:
        from ofa_scale.training.config import load_training_config, world_size_from_env

        cfg = load_training_config(args.config, args.overrides)
        world = args.world_size or world_size_from_env()
        if world < 1:
            raise UserError("--world-size must be a positive number of processes")
        if args.check:
            from ofa_scale.training.check import check_config

            print(check_config(cfg, world))
            return 0
        from ofa_scale.training.loop import Trainer, plan, train

        if args.validate_only:
            workload, layout, grad_accum = plan(cfg, world)
            print(f"ofa-train: config is valid ({layout.describe()}, gradient accumulation {grad_accum}, "
                  f"{workload.cfg.train.steps} updates)")
            return 0

        if args.stop_after is not None and args.stop_after < 1:
            raise UserError("--stop-after must be a positive number of steps")
        run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
        trainer_cls = Trainer
        if cfg.finetuning:
            from ofa_scale.finetune.trainer import FinetuneTrainer as trainer_cls
        train(cfg, run_dir, resume=args.resume, stop_after=args.stop_after, stop=stop, trainer_cls=trainer_cls)
        return 0

    try:
        return run_cli(go, "ofa-train")
    finally:
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())

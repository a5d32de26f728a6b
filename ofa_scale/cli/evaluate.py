"""`ofa-eval`: score predictions against references, generate-and-score with a checkpoint, build CIDEr caches,
evaluate a finetuning recipe (`run`).

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; only the chosen
one is imported, so `ofa-eval score` never imports torch or the model.
"""

from __future__ import annotations

import sys

from ofa_scale.cli import subcommand_main

SUBCOMMANDS = {
    "score": ("ofa_scale.evaluation.score", "score a predictions JSONL against a references JSONL"),
    "generate": ("ofa_scale.evaluation.generate_cli",
                 "generate with a checkpoint on held-out shard records, then score"),
    "cider-df": ("ofa_scale.evaluation.cider_df", "cache CIDEr-D document frequencies from reference captions"),
    "run": ("ofa_scale.finetune.eval_cli",
            "evaluate a finetuned checkpoint with its recipe's task and metrics (results.json, metrics.json)"),
    "fid-stats": ("ofa_scale.evaluation.fid_stats_cli",
                  "write OFA's gt_stat.npz (Inception mu/sigma) of a folder of reference images for FID"),
    "report": ("ofa_scale.evaluation.report", "draw a run's metrics.jsonl into PNGs and a markdown report"),
}


def main(argv: list[str] | None = None) -> int:
    return subcommand_main("ofa-eval", __doc__.splitlines()[0], SUBCOMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())

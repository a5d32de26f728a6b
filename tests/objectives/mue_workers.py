"""Multi-process scenario for MuE's all-layer training loss under tensor parallelism and ZeRO-3, one process per
rank, launched by tests/parallel/parallel_launch.launch with this file as the worker.

    python mue_workers.py mue_train OUT_DIR PARAMS_JSON      (RANK, WORLD_SIZE, MASTER_* in the environment)

The trainer's own step (training/step.py run_step with LossSettings.all_layers) on parallel_workers' tiny OFA with
`mue=True` and its fixed micro-batches, from the canonical initial weights, so layouts compare step by step.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

from parallel_workers import (EPS, GLOBAL_MICRO_BATCHES, MICRO, ds_config, freeze_batchnorm_stats,  # noqa: E402
                              init_dist, micro_batch, tiny_config)

INPUTS = ("src_tokens", "patch_images", "patch_masks", "prev_output_tokens", "code_masks")


def scenario_mue_train(out: Path, p: dict) -> dict:
    import deepspeed

    from ofa_scale.model import OFAModel
    from ofa_scale.parallel import canonical
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader
    from ofa_scale.parallel.context import setup_parallel
    from ofa_scale.parallel.layout import ParallelConfig, validate_layout
    from ofa_scale.training.metrics import TaskAccumulator
    from ofa_scale.training.step import GroupsForward, LossSettings, run_step

    init_dist()
    cfg = dataclasses.replace(tiny_config(), mue=True)
    layout = validate_layout(ParallelConfig(tp=p.get("tp", 1), zero_stage=p.get("zero", 1)), cfg,
                             torch.distributed.get_world_size())
    ctx = setup_parallel(layout)
    gas = GLOBAL_MICRO_BATCHES // layout.dp
    model = ctx.build_model(cfg, OFAModel)
    freeze_batchnorm_stats(model)
    canonical.load_model_weights(ctx, model, CanonicalReader(p["init"]).view(MODEL))  # this rank's slices
    wrapped = GroupsForward(model)
    engine, *_ = deepspeed.initialize(model=wrapped, config=ds_config(layout, gas, p.get("zero", 1) == 3),
                                      model_parameters=[q for q in wrapped.parameters() if q.requires_grad],
                                      mpu=ctx.mpu)
    settings = LossSettings(epsilon=EPS, pad=1, per_group=True, all_layers=p.get("all_layers", True))
    losses = []
    for step in range(p["steps"]):
        mine = range(ctx.dp_rank * gas, (ctx.dp_rank + 1) * gas)
        batches = [{"vl": {**micro_batch(step, i), "task_ids": torch.zeros(MICRO, dtype=torch.long)}} for i in mine]
        acc = TaskAccumulator(["t"])
        run_step(engine, ctx, batches, ["vl"], lambda g, gb, m: {k: gb[k] for k in INPUTS}, settings, acc)
        acc.all_reduce(ctx.dp_group)
        losses.append(acc.objective)
    return {"losses": losses}


if __name__ == "__main__":
    import parallel_workers

    # parallel_workers' entry point runs `scenario_<name>` from its own module namespace: add ours to it
    for _name, _fn in list(globals().items()):
        if _name.startswith("scenario_"):
            setattr(parallel_workers, _name, _fn)
    parallel_workers.main()

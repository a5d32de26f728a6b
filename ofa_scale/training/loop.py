"""The training run: validate → process groups → DeepSpeed engine → steps, metrics, checkpoints, mlflow.

`train(cfg, run_dir, resume)` is what `ofa-train` calls after parsing; it returns a small summary dict.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.parallel.layout import validate_layout
from ofa_scale.training.checkpoint import (ResumePoint, load_rank_state, rng_state, save_checkpoint, set_rng_state)
from ofa_scale.training.config import TrainingConfig, check_world
from ofa_scale.training.ds_config import build_ds_config
from ofa_scale.training.metrics import MetricsFile, StepTimer, TaskAccumulator, console_line
from ofa_scale.training.run_dir import RunDir, open_run_dir
from ofa_scale.training.schedule import schedule_from_config, scheduler_factory
from ofa_scale.training.layout_model import build_layout_model
from ofa_scale.training.layout_resume import (load_canonical_optimizer, load_canonical_weights, require_canonical,
                                              same_layout, write_canonical)
from ofa_scale.training.pipeline_step import (PipelineLoss, pipeline_ds_overrides, pipeline_micro_batches,
                                              reduce_metrics, run_pipeline_step)
from ofa_scale.training.step import GroupsForward, LossSettings, run_step
from ofa_scale.training.workload import OFAPretraining
from ofa_scale.utils.config import flatten

@dataclasses.dataclass
class Launch:
    """What the launcher tells this process (read once, before any process group exists)."""

    world_size: int
    rank: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Launch":
        env = os.environ
        return cls(world_size=int(env.get("WORLD_SIZE", "1")), rank=int(env.get("RANK", "0")),
                   local_rank=int(env.get("LOCAL_RANK", "0")))


def train(cfg: TrainingConfig, run_dir: str | Path, resume: bool = False,
          stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train to cfg.train.steps (or `stop_after` more steps, or until SIGTERM/SIGUSR1), checkpointing on the way."""
    launch = Launch.from_env()
    workload, layout, grad_accum = prepare(cfg, launch.world_size)
    run, point = open_run_dir(run_dir, resume)
    if point is not None:
        _check_resume_compatible(cfg, point, launch.world_size, layout)

    # ---- process groups ------------------------------------------------------------------------------------
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ofa_scale.parallel import setup_parallel

    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    if launch.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # a plain `python -m ofa_scale.train`: a one-process group, so the same code path runs everywhere
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    if not on_cpu:
        accel.set_device(launch.local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False)
    ctx = setup_parallel(layout, seed=cfg.train.seed)
    rank = dist.get_rank()
    is_main = rank == 0
    _quiet_other_ranks(is_main)

    result = _run(cfg, run, point, workload, layout, ctx, grad_accum, on_cpu, is_main, rank, accel, stop_after)
    # Only on success: after an error on one rank a barrier would wait for ranks stuck in a collective, and the
    # launcher could never see this rank exit and stop the others.
    dist.barrier()
    from ofa_scale.parallel.context import teardown_parallel

    teardown_parallel()
    dist.destroy_process_group()
    return result


def prepare(cfg: TrainingConfig, world_size: int):
    """Everything that can fail because of the user, before any process group: batch arithmetic, tokenizer,
    shards, model config, objective composition, parallel layout. Returns (workload, layout, grad_accum)."""
    grad_accum = check_world(cfg, world_size)
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 kernels); "
                          "use precision=bf16 or fp32 on CPU")
    workload = OFAPretraining(cfg)
    # parallel.micro_batches (the pipeline schedule length) is the gradient accumulation the batch sizes imply;
    # a pipeline runs each group (vl, aux) of a loader micro-batch as its own micro-batch (pipeline_step.py)
    schedule = grad_accum
    if cfg.parallel.pp > 1:
        schedule = pipeline_micro_batches(grad_accum, len(workload.composition().group_sizes()))
    parallel = dataclasses.replace(cfg.parallel, micro_batches=schedule)
    layout = validate_layout(parallel, workload.model_config, world_size)
    if layout.pp > 1 and "aux" in workload.composition().group_sizes() and cfg.objectives.scaled.sample_patch_num:
        # the pipeline's first stage embeds every patch; OFA's patch sampling on the image-text group (used when
        # an auxiliary group shares the batch) has no pipeline counterpart yet
        raise ConfigError("parallel.pp > 1 does not support image patch sampling; set objectives.sample_patch_num=0 "
                          "or parallel.pp=1")
    return workload, layout, grad_accum


def _run(cfg, run: RunDir, point: Optional[ResumePoint], workload, layout, ctx, grad_accum, on_cpu, is_main,
         rank, accel, stop_after: Optional[int]) -> dict[str, Any]:
    import deepspeed

    device = torch.device(accel.device_name(accel.current_device()) if not on_cpu else "cpu")
    loss_settings = LossSettings(epsilon=cfg.objectives.label_smoothing, pad=workload.pad,
                                 per_group=cfg.objectives.loss_normalization == "per_group")
    pipeline_loss = PipelineLoss(ctx, loss_settings) if layout.pp > 1 else None
    # Identical initial weights on every rank and in every layout (the tp=1 model's at this seed); then
    # per-data-rank dropout streams.
    model = build_layout_model(ctx, workload, cfg.train.seed, pipeline_loss)
    workload.load_pretrained_into(model, ctx)
    # DeepSpeed's own files resume the same layout exactly, except under pp > 1: DeepSpeed's pipeline checkpoint
    # skips tied layers that have a forward_fn, i.e. OFA's shared embedding, so pipelines always resume from the
    # layout-free copy (and, with the same layout, still restore the per-rank RNG streams below).
    from_canonical = point is not None and (layout.pp > 1 or not _same_layout(point, layout))
    if from_canonical:
        load_canonical_weights(point.tag_dir, ctx, model)
    if not on_cpu:
        model.to(device)  # the ZeRO-3 probe below then runs at GPU speed; DeepSpeed keeps the placement
    if layout.pp == 1:  # pipeline layers are checkpointed by the pipeline builder (parallel.activation_checkpointing)
        workload.set_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    torch.manual_seed(cfg.train.seed + 1 + ctx.dp_rank)

    loader = workload.build_loader(dp_rank=ctx.dp_rank, dp_size=layout.dp)
    start_step = 0
    mlflow_run_id = None
    if point is not None:
        loader.load_state_dict(point.record["loader_state"])
        start_step = point.step
        mlflow_run_id = point.mlflow_run_id
    batches = iter(loader)
    first_micro_batches = [next(batches) for _ in range(grad_accum)]
    dtype = _compute_dtype(cfg.precision)
    if cfg.parallel.zero_stage == 3:
        # Probe the real first micro-batch (all groups) for parameters used outside their owner's forward.
        from ofa_scale.training.zero3 import find_external_parameters, register_external_parameters

        probe_inputs = workload.input_builder(step=start_step + 1, dp_rank=ctx.dp_rank, dp_size=layout.dp,
                                              device=device, dtype=torch.float32)
        mb = first_micro_batches[0]
        probe = {g: probe_inputs(g, mb[g], 0) for g in workload.groups if g in mb}
        model.eval()  # no BatchNorm statistics updates and no dropout draws from the probe
        register_external_parameters(model, find_external_parameters(
            model, lambda: [model(**kw) for kw in probe.values()]))
        model.train()

    if dtype != torch.float32:
        # DeepSpeed casts parameters only; BatchNorm running statistics must follow or the ResNet stem's
        # batch_norm sees bf16/fp16 weights with fp32 statistics and refuses (fairseq's .half() casts both too).
        model.to(dtype)
    ds_config = build_ds_config(cfg, layout.dp, grad_accum, on_cpu)
    if layout.pp > 1:
        ds_config = pipeline_ds_overrides(ds_config, layout.dp, layout.micro_batches)
        wrapped = model  # the PipelineModule runs its stages itself (engine.train_batch)
    else:
        wrapped = GroupsForward(model)
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=scheduler_factory(schedule_from_config(cfg)), mpu=ctx.mpu if layout.pp == 1 else None)
    if from_canonical:
        load_canonical_optimizer(point.tag_dir, ctx, engine, lr_scheduler)
    elif point is not None:
        engine.load_checkpoint(str(run.checkpoints), tag=point.tag, load_module_strict=True,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    if point is not None and _same_layout(point, layout):
        set_rng_state(load_rank_state(point, rank)["rng"])

    tracker = None
    metrics_file = None
    failure: list[Optional[str]] = [None]
    if is_main:
        try:
            run.root.mkdir(parents=True, exist_ok=True)
            run.write_config(cfg.to_dict())
            run.write_json(run.ds_config, ds_config)
            run.write_json(run.layout, layout.to_dict())
            metrics_file = MetricsFile(run.metrics)
            metrics_file.truncate_after(start_step if point is not None else None)
            tracker = _start_mlflow(cfg, run, layout, ds_config, workload, mlflow_run_id)
        except UserError as e:
            failure[0] = str(e)
    # Rank 0 alone talks to mlflow and writes the run directory; when that fails every rank must stop here
    # instead of waiting forever in the first collective of the step loop.
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        if not is_main:
            raise SystemExit(2)  # rank 0 prints the one-line reason; hundreds of copies would bury it
        raise UserError(failure[0])
    if is_main:
        mlflow_run_id = tracker.run_id if tracker is not None else None
        print(f"ofa-train: {layout.describe()}, grad accumulation {grad_accum}, "
              f"{'resuming at step ' + str(start_step) if start_step else 'starting'}; run dir {run.root}",
              flush=True)
        if tracker is not None:
            print(f"ofa-train: {tracker.describe()}", flush=True)

    timer = StepTimer(cfg.train.steps - start_step)
    last_record: dict[str, Any] = {}
    status = "FAILED"
    stop = StopRequest(stop_after)
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            timer.start()
            if first_micro_batches is not None:
                micro_batches, first_micro_batches = first_micro_batches, None
            else:
                micro_batches = [next(batches) for _ in range(grad_accum)]
            acc = TaskAccumulator(workload.tasks)
            lr = float(lr_scheduler.get_last_lr()[0])
            to_inputs = workload.input_builder(step=step, dp_rank=ctx.dp_rank, dp_size=layout.dp, device=device,
                                               dtype=dtype)
            if pipeline_loss is not None:
                run_pipeline_step(engine, ctx, micro_batches, workload.groups, to_inputs, loss_settings, acc,
                                  pipeline_loss)
                reduce_metrics(acc)  # the last stage's numbers, now on every rank (rank 0 logs them)
            else:
                run_step(engine, ctx, micro_batches, workload.groups, to_inputs, loss_settings, acc)
                acc.all_reduce(ctx.dp_group)
            dt = timer.stop()
            record = _step_record(step, acc, lr, engine, dt, workload, device)
            last_record = record
            if is_main:
                metrics_file.append(record)
                if tracker is not None:
                    tracker.log_metrics(step, {k: v for k, v in record.items() if k != "step"})
                if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                    print(console_line(record, cfg.train.steps, timer.eta_seconds(step - start_step)),
                          flush=True)
            stopping = stop.after_step()
            if step % cfg.train.ckpt_interval == 0 or step == cfg.train.steps or stopping:
                tag_dir = _checkpoint(cfg, run, engine, loader, step, rank, ctx, mlflow_run_id, layout,
                                      workload.model_config, lr_scheduler)
                if is_main:
                    print(f"ofa-train: checkpoint {tag_dir}", flush=True)
            if stopping and step < cfg.train.steps:
                if is_main:
                    print(f"ofa-train: stopping at step {step} ({stop.reason}); continue with --resume", flush=True)
                status = "KILLED"
                break
        else:
            status = "FINISHED"
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if tracker is not None:
            tracker.finish(status if status != "FAILED" else "KILLED" if _interrupted() else "FAILED")
        stop.restore()
    return {"steps": cfg.train.steps, "last": last_record, "run_dir": str(run.root),
            "checkpoint": str(run.checkpoints), "mlflow_run_id": mlflow_run_id}


class StopRequest:
    """Stop cleanly (checkpoint, then exit) after `stop_after` steps of this invocation or on SIGTERM/SIGUSR1.

    Slurm sends SIGTERM (or the signal chosen with --signal) before preempting or at the time limit; the step in
    progress finishes, every rank agrees through one all-reduce, and the checkpoint lets a requeued job resume.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, stop_after: Optional[int]):
        import signal

        self.stop_after = stop_after
        self.steps = 0
        self.signalled = False
        self.reason = ""
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.signalled = True

    def after_step(self) -> bool:
        self.steps += 1
        flag = torch.tensor([1.0 if self.signalled else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank signalled is enough: all stop at the same step
        if flag.item() > 0:
            self.reason = "signal received"
            return True
        if self.stop_after is not None and self.steps >= self.stop_after:
            self.reason = f"--stop-after {self.stop_after}"
            return True
        return False

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _step_record(step: int, acc: TaskAccumulator, lr: float, engine, dt: float, workload, device) -> dict:
    loss = acc.objective  # exactly the value whose gradient the step applied (objectives.loss_normalization)
    grad_norm = engine.get_global_grad_norm()
    if isinstance(grad_norm, torch.Tensor):
        grad_norm = float(grad_norm)
    record = {"step": step, "loss": loss}
    record.update(acc.task_metrics())
    record.update({
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "samples_per_s": acc.rows / dt,
        "tokens_per_s": acc.input_tokens / dt,
        "skipped_steps": int(engine.skipped_steps),
        "step_time_s": dt,
    })
    mfu = workload.mfu(dt, dist.get_world_size())
    if mfu is not None:
        record["mfu"] = mfu
    return record


def _checkpoint(cfg, run: RunDir, engine, loader, step, rank, ctx, mlflow_run_id, layout, model_config,
                lr_scheduler) -> Path:
    from ofa_scale.data.loader import merge_loader_states

    # Every data-parallel rank owns different streams; the merged state lets any world size dividing the stream
    # count resume (tp/pp peers hold identical loader states, so gathering over the world is harmless).
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, loader.state_dict())
    record = {
        "world_size": dist.get_world_size(),
        "layout": layout.to_dict(),
        "mlflow_run_id": mlflow_run_id,
        "loader_state": merge_loader_states(states),
        "config": cfg.to_dict(),
    }
    # the layout-free copy lets --resume continue under another tp/pp/dp/ZeRO layout (layout_resume.py)
    return save_checkpoint(engine, run.checkpoints, step, rank, {"rng": rng_state()}, record,
                           keep=cfg.train.keep_checkpoints,
                           write_extra=lambda tag_dir: write_canonical(ctx, engine, tag_dir, model_config, step,
                                                                       lr_scheduler))


def _same_layout(point: ResumePoint, layout) -> bool:
    return same_layout(point.record.get("layout"), point.record.get("world_size"), layout, dist.get_world_size())


def _check_resume_compatible(cfg: TrainingConfig, point: ResumePoint, world_size: int, layout) -> None:
    saved = point.record.get("config", {})
    for section, keys in (("train", ("global_batch_size", "micro_batch_size", "seed")),
                          ("data", ("root",))):
        for key in keys:
            old = saved.get(section, {}).get(key)
            new = getattr(getattr(cfg, section), key)
            if old is not None and old != new:
                raise ConfigError(f"{section}.{key} was {old!r} when {point.tag_dir} was written but is {new!r} now; "
                                  f"resume with the original value or start a new --run-dir")
    saved_world, saved_layout = point.record.get("world_size"), point.record.get("layout")
    if layout.pp > 1 or not same_layout(saved_layout, saved_world, layout, world_size):
        # DeepSpeed's ZeRO partitions, pipeline files and our per-rank RNG files are per process; another layout
        # resumes from the layout-free copy next to them (layout_resume.py)
        require_canonical(point.tag_dir, saved_layout, saved_world)
    if point.step >= cfg.train.steps:
        raise UserError(f"the run already reached step {point.step} (train.steps={cfg.train.steps}); raise "
                        f"train.steps to continue it")


def _start_mlflow(cfg, run: RunDir, layout, ds_config: dict, workload, run_id: Optional[str]):
    if not cfg.logging.mlflow:
        return None
    from ofa_scale.training.mlflow_logger import MlflowRun, git_commit, resolve_tracking_uri

    uri = resolve_tracking_uri(run.root, cfg.logging.tracking_uri)
    tracker = MlflowRun(uri, cfg.logging.experiment, cfg.logging.run_name or run.root.resolve().name, run.root,
                        run_id=run_id)
    if not tracker.resumed:
        params = {f"config.{k}": v for k, v in flatten(cfg.to_dict()).items()}
        params.update({f"layout.{k}": v for k, v in flatten(layout.to_dict()).items()})
        params.update({f"deepspeed.{k}": v for k, v in flatten(ds_config).items()})
        params["git_commit"] = git_commit(Path(__file__).resolve().parents[2])
        tracker.log_params(params)
        tracker.log_artifact(run.config)
        tracker.log_artifact(run.ds_config)
        tracker.log_artifact(run.layout)
        manifest = Path(cfg.data.root) / "manifest.json"
        tracker.log_artifact(manifest, "data")
    tracker.set_tags({"run_dir": str(run.root.resolve())})
    return tracker


def _quiet_other_ranks(is_main: bool) -> None:
    # DeepSpeed logs through the "DeepSpeed" logger on every rank; keep only rank 0's warnings and errors.
    level = logging.WARNING if is_main else logging.ERROR
    logging.getLogger("DeepSpeed").setLevel(level)


def _interrupted() -> bool:
    exc = sys.exc_info()[1]
    return isinstance(exc, KeyboardInterrupt)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

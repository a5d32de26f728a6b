"""Multi-process scenarios for tests/parallel, one process per rank (launched by conftest.launch).

    python parallel_workers.py SCENARIO OUT_DIR PARAMS_JSON      (RANK, WORLD_SIZE, MASTER_* in the environment)

Every rank writes OUT_DIR/result{rank}.json. The training scenario is a minimal DeepSpeed loop (our own, not the
trainer's) over fixed synthetic micro-batches of a tiny OFA, so layouts can be compared step by step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

VOCAB = 203  # odd on purpose: tp=2 must pad it
IMAGE = 32
SRC, TGT = 8, 6
MICRO = 2  # samples per micro-batch
GLOBAL_MICRO_BATCHES = 2  # micro-batches per optimizer step over all data-parallel ranks
EPS = 0.1


def tiny_config():
    from ofa_scale.model.config import OFAConfig

    return OFAConfig(d_model=64, ffn_dim=128, heads=4, encoder_layers=2, decoder_layers=2, vocab_size=VOCAB,
                     resnet="resnet50", max_source_positions=64, max_target_positions=64, attention_impl="math")


def micro_batch(step: int, index: int) -> dict:
    """The index-th micro-batch of optimizer step `step` (identical on every rank and layout)."""
    g = torch.Generator().manual_seed(1000 * step + index)
    b = MICRO
    src = torch.randint(4, VOCAB, (b, SRC), generator=g)
    src[:, 0] = 0
    src[0, -2:] = 1  # padding
    src[1, -1] = 2
    prev = torch.randint(4, VOCAB, (b, TGT), generator=g)
    prev[:, 0] = 0
    target = torch.randint(4, VOCAB, (b, TGT), generator=g)
    target[0, -1] = 1  # ignored position
    prev[0, -1] = 1
    constraint = torch.rand(b, TGT, VOCAB, generator=g) < 0.5
    constraint[torch.arange(b)[:, None], torch.arange(TGT)[None], target] = True
    constraint[1] = True  # second sample unconstrained
    return dict(
        src_tokens=src,
        patch_images=torch.randn(b, 3, IMAGE, IMAGE, generator=g),
        patch_masks=torch.tensor([True, index % 2 == 0]),
        prev_output_tokens=prev,
        code_masks=torch.tensor([False, step % 2 == 1]),
        target=target,
        conf=torch.tensor([1.0, 2.0]) if index % 2 else torch.tensor([0.5, 1.0]),
        constraint_masks=constraint,
    )


def token_mean_loss(ctx, logits, batch):
    out = ctx.token_losses(logits, batch["target"], epsilon=EPS, ignore_index=1, conf=batch["conf"],
                           constraint_masks=batch["constraint_masks"])
    return out.loss.sum() / out.valid.sum()


def patch_sampling(p: dict, step: int, index: int) -> dict:
    """OFA's patch sampling for micro-batch `index` of `step` when the scenario asks for it (param "spn"): the
    model kwargs, with a generator seeded per micro-batch as the trainer does."""
    if not p.get("spn"):
        return {}
    generator = torch.Generator().manual_seed(10_000 + 1000 * step + index)
    return dict(sample_patch_num=p["spn"], patch_generator=generator)


def pipeline_item(batch, sampling: dict):
    from ofa_scale.parallel.pipeline_layers import pipeline_inputs

    inputs = pipeline_inputs(batch["src_tokens"], batch["patch_images"], batch["patch_masks"],
                             batch["prev_output_tokens"], batch["code_masks"], **sampling)
    labels = (batch["target"], batch["conf"], batch["constraint_masks"])
    return inputs, labels


def freeze_batchnorm_stats(model):
    """BatchNorm in eval mode (running statistics, still trained affine parameters). With 2 tiny images per
    micro-batch, train-mode BN divides by a near-zero batch variance and amplifies 1e-7 summation-order
    differences into 1e-3 gradient differences; that would measure BN's conditioning, not the layouts."""
    import types

    def stay_in_eval(self, mode=True):  # DeepSpeed's pipeline engine calls module.train() every batch
        return torch.nn.Module.train(self, False)

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train = types.MethodType(stay_in_eval, m)
            m.eval()


def ds_config(layout, gas: int, partition_all: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                   "weight_decay": 0.01, "torch_adam": True}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": layout.zero_stage},
        "steps_per_print": 10**9,
    }
    if partition_all:  # ZeRO-3 keeps parameters under this size whole on every rank by default; partition all
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0,
                                        stage3_prefetch_bucket_size=0)
    if layout.pp > 1:
        from ofa_scale.parallel.pipeline import pipeline_ds_config

        cfg.update(pipeline_ds_config())
    return cfg


def init_dist():
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def scenario_train(out: Path, p: dict) -> dict:
    """Train `steps` steps in the given layout from the canonical initial weights; report losses and norms."""
    import deepspeed

    from ofa_scale.model import OFAModel
    from ofa_scale.parallel import canonical
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader
    from ofa_scale.parallel.context import setup_parallel
    from ofa_scale.parallel.layout import ParallelConfig, validate_layout

    rank, world = init_dist()
    cfg = tiny_config()
    pcfg = ParallelConfig(tp=p.get("tp", 1), pp=p.get("pp", 1), zero_stage=p.get("zero", 1),
                          activation_checkpointing=p.get("ckpt", False), partition=p.get("partition", "flops"),
                          stage_layers=p.get("stage_layers", []))
    layout = validate_layout(pcfg, cfg, world)
    ctx = setup_parallel(layout)
    shapes = canonical.full_shapes(cfg)
    gas = GLOBAL_MICRO_BATCHES // layout.dp

    def loss_fn(logits, labels):
        target, conf, constraint = labels
        return token_mean_loss(ctx, logits, dict(target=target, conf=conf, constraint_masks=constraint))

    torch.manual_seed(0)
    model = ctx.build_model(cfg, OFAModel, loss_fn=loss_fn, image_size=IMAGE, src_len=SRC, tgt_len=TGT)
    if layout.activation_checkpointing and layout.pp == 1:  # pipelines checkpoint their own layers
        from ofa_scale.training.prepare import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    freeze_batchnorm_stats(model)
    start_step = 0
    source = CanonicalReader(p.get("resume") or p["init"]) if p.get("resume") or p.get("init") else None
    if p.get("resume"):
        start_step = source.meta["extra"]["step"]
    if source is not None:  # this rank's slices only
        canonical.load_model_weights(ctx, model, source.view(MODEL))
    local_numel = sum(t.numel() for _, t in canonical.named_parameters(model))
    replicated = {n: t.detach().clone() for n, t in canonical.named_parameters(model) if n not in ctx.split_params}

    engine, *_ = deepspeed.initialize(model=model, config=ds_config(layout, gas, p.get("partition_all", False)),
                                      model_parameters=[q for q in model.parameters() if q.requires_grad],
                                      mpu=ctx.mpu if layout.pp == 1 else None)
    if p.get("resume"):
        canonical.load_optimizer_state(ctx, engine, source, source.meta["optimizer_step"])
    if p.get("ds_load"):  # DeepSpeed's own checkpoint of the same layout
        _, client = engine.load_checkpoint(p["ds_load"], tag="saved")
        start_step = client["step"]
    result = {}
    if p.get("export_at_start"):  # round trip: what was just scattered over the layout, saved back
        result["export_at_start"] = canonical.save_canonical(ctx, engine, p["export_at_start"], shapes)

    losses, norms = [], []
    for step in range(start_step, start_step + p["steps"]):
        indices = list(range(GLOBAL_MICRO_BATCHES))[ctx.dp_rank * gas:(ctx.dp_rank + 1) * gas]
        mine = [(micro_batch(step, i), patch_sampling(p, step, i)) for i in indices]
        if layout.pp > 1:
            loss = engine.train_batch(data_iter=iter([pipeline_item(b, s) for b, s in mine]))
            loss = float(loss)
        else:
            total = torch.zeros(())
            for b, sampling in mine:
                logits = engine(src_tokens=b["src_tokens"], patch_images=b["patch_images"],
                                patch_masks=b["patch_masks"], prev_output_tokens=b["prev_output_tokens"],
                                code_masks=b["code_masks"], **sampling)
                loss = token_mean_loss(ctx, logits, b)
                engine.backward(loss)
                engine.step()
                total += loss.detach() / gas
            if layout.dp > 1:
                dist.all_reduce(total, group=ctx.dp_group)
                total /= layout.dp
            loss = float(total)
        losses.append(loss)
        norm = engine.get_global_grad_norm()  # None without ZeRO in fp32 (DeepSpeed does not record it)
        norms.append(float(norm) if norm is not None else float("nan"))
        if p.get("save_at") == step + 1:
            result["save"] = canonical.save_canonical(ctx, engine, p["save_dir"], shapes, extra={"step": step + 1},
                                                      model_config=cfg)
        if p.get("ds_save_at") == step + 1:
            engine.save_checkpoint(p["ds_save_dir"], tag="saved", client_state={"step": step + 1})

    result.update({"losses": losses, "grad_norms": norms, "local_params": local_numel, "mpu": _mpu_answers(ctx),
                   "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
                   "stage_blocks": getattr(engine.module, "stage_blocks", None),
                   "optimizer_numel": _optimizer_numel(engine), "zero3_partition": _zero3_partition(engine),
                   "bytes_read": source.bytes_read if source is not None else 0})  # this rank's checkpoint reads
    # replicated parameters must stay identical across TP ranks: report a checksum of their final values (fp32
    # masters: under ZeRO-3 the module's own tensors are partitions; the fetch is collective over dp)
    final = {n: canonical.fp32_value(t) for n, t in canonical.named_parameters(engine) if n in replicated}
    result["replicated_checksum"] = {n: float(t.double().abs().sum()) for n, t in final.items()}
    if p.get("export"):
        canonical.save_canonical(ctx, engine, p["export"], shapes)
    return result


def _mpu_answers(ctx) -> dict:
    m = ctx.mpu
    ranks = dist.get_process_group_ranks
    return {
        "tp": [m.get_tensor_model_parallel_rank(), m.get_tensor_model_parallel_world_size(),
               ranks(m.get_tensor_model_parallel_group())],
        "mp": [m.get_model_parallel_rank(), m.get_model_parallel_world_size(), ranks(m.get_model_parallel_group())],
        "slice": [m.get_slice_parallel_rank(), m.get_slice_parallel_world_size()],
        "pp": [m.get_pipeline_model_parallel_rank(), m.get_pipeline_model_parallel_world_size(),
               ranks(m.get_pipeline_model_parallel_group())],
        "dp": [m.get_data_parallel_rank(), m.get_data_parallel_world_size(), ranks(m.get_data_parallel_group()),
               m.get_data_parallel_group_ranks()],
    }


def _optimizer_numel(engine) -> int:
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return sum(v.numel() for st in inner.state.values() for k, v in st.items()
               if k in ("exp_avg", "exp_avg_sq"))


def _zero3_partition(engine) -> int:
    return sum(p.ds_tensor.numel() for p in engine.module.parameters() if hasattr(p, "ds_tensor"))


def scenario_write_init(out: Path, p: dict) -> dict:
    """Single process: the seeded tiny model's weights as a canonical checkpoint (the shared starting point)."""
    from ofa_scale.model import OFAModel
    from ofa_scale.parallel.canonical_store import write_full

    torch.manual_seed(0)
    model = OFAModel(tiny_config())
    write_full(p["dir"], {n: t.detach() for n, t in model.named_parameters()}, meta={"extra": {"step": 0}})
    return {"params": sum(t.numel() for t in model.parameters())}


def _vm_kib(field: str) -> int:
    import re

    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def scenario_stage_build(out: Path, p: dict) -> dict:
    """A pipeline rank builds only its own stage: the host memory the build adds at its peak (the kernel's
    high-water mark, reset just before) against the bytes of the stage it keeps and of the whole model, and the
    stage's values against the layout-independent initial weights the single process starts from."""
    import itertools

    import deepspeed.pipe  # noqa: F401  (imported before the measurement: imports are not the build)

    import ofa_scale.parallel.pipeline  # noqa: F401
    from ofa_scale.model import OFAModel
    from ofa_scale.model.config import OFAConfig
    from ofa_scale.model.init import InitialWeights
    from ofa_scale.parallel import canonical
    from ofa_scale.parallel.context import setup_parallel
    from ofa_scale.parallel.layout import ParallelConfig, validate_layout
    from ofa_scale.utils.malloc import release_free_memory

    _, world = init_dist()
    # wide layers, so that the parameters dominate what Python, gloo and DeepSpeed allocate on the way, and small
    # image-position tables (at OFA's 42 buckets, computing them takes ~150 MB for a moment, whatever the model size)
    cfg = OFAConfig(d_model=768, ffn_dim=3072, heads=12, encoder_layers=6, decoder_layers=6, vocab_size=VOCAB,
                    resnet="resnet50", max_source_positions=64, max_target_positions=64, attention_impl="math",
                    image_bucket_size=16, code_image_size=128)
    layout = validate_layout(ParallelConfig(pp=world, partition="explicit", stage_layers=p["stage_layers"]), cfg,
                             world)
    ctx = setup_parallel(layout)
    release_free_memory()
    before = _vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    model = ctx.build_model(cfg, OFAModel, seed=p["seed"], image_size=IMAGE, src_len=SRC, tgt_len=TGT)
    peak = (_vm_kib("VmHWM") - before) * 1024

    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))

    with torch.device("meta"):
        whole = nbytes(OFAModel(cfg))
    initial = InitialWeights(cfg, p["seed"])
    named = list(canonical.named_parameters(model)) + list(canonical.named_statistics(model))
    return {"peak": peak, "stage": nbytes(model), "whole": whole, "names": [n for n, _ in named],
            "initial": all(torch.equal(t, initial[n]) for n, t in named), "all_names": list(initial)}


def main():
    scenario, out, params = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    if os.environ.get("OFA_ANOMALY"):  # debugging aid: forward traceback of a failing backward op
        import warnings

        warnings.simplefilter("always")
        torch.autograd.set_detect_anomaly(True)
    result = globals()[f"scenario_{scenario}"](out, params)
    rank = int(os.environ.get("RANK", 0))
    (out / f"result{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The one place that prepares the model for the engine: layout shard, initial weights, dtype, activation
checkpointing, compilation, device.

    model = prepare_model(cfg, ctx, model_config, seed=…, fill=…)

1. **Build** this rank's module under the layout (ctx.build_model: the tensor-parallel shard, or for pp > 1 the
   pipeline module): on the meta device (nothing allocated, no random draws), or under `deepspeed.zero.Init` for
   ZeRO-3 (each parameter partitioned over the data-parallel ranks as soon as its module exists). A pipeline
   stage carves a meta model and allocates only its own layers, already filled with the initial weights
   (parallel/pipeline.py).
2. **Materialise** it on the CPU (`to_empty`) and **fill** every parameter and BatchNorm statistic: by default
   with the layout-independent initial weights of `ofa_scale/model/init.py`, one full tensor at a time, each rank
   keeping only its slice, so every layout starts from exactly the single-process model's weights while no rank
   holds more than its shard plus one tensor. `fill(model)` replaces this (resume from the layout-free
   checkpoint); `model.pretrained` is then loaded on top, shard by shard. Finetuning's `train.freeze_*` flags
   are applied next (finetune/freeze.py), before DeepSpeed sees which parameters require gradients.
3. **dtype**: DeepSpeed casts parameters; BatchNorm statistics must follow (the stem's batch_norm refuses bf16
   weights with fp32 statistics), so buffers are cast here.
4. **Activation checkpointing** (pp == 1: each encoder/decoder layer's forward is recomputed in backward; pp > 1:
   the pipeline builder checkpoints its layers).
5. **Compilation** (`train.compile`, `train.channels_last`): per layer and for the ResNet stem (`train.compile_scope`).
6. **Device**: the accelerator, so DeepSpeed's ZeRO-3 partitioning happens there.
7. **Trim**: the memory the build freed goes back to the OS (utils/malloc.py).

ZeRO-3 needs no registration: the model calls every table it uses as a module (docs/interfaces.md §5), so
DeepSpeed's module hooks gather each parameter exactly when its owner runs.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ofa_scale.errors import ConfigError
from ofa_scale.utils.malloc import release_free_memory

CHECKPOINTED = "_ofa_checkpointed"


def build_on_meta(ctx, model_config) -> nn.Module:
    """This rank's (tensor-parallel) module on the meta device: nothing allocated, no random draws."""
    with torch.device("meta"):
        return ctx.build_model(model_config)


def build_module(ctx, model_config, *, pipeline_loss: Optional[Callable] = None, pipeline_shapes: dict | None = None,
                 zero_init: Optional[dict] = None) -> tuple[nn.Module, bool]:
    """(module, is_meta).

    * ZeRO-3 (`zero_init` = the DeepSpeed config): built under `deepspeed.zero.Init`, which partitions each
      submodule's parameters over the data-parallel ranks as soon as it is constructed, so no rank ever holds the
      whole model; the weights are then written partition by partition (`zero3_params.write_local`).
    * pp > 1: a DeepSpeed PipelineModule moves its layers to the device and broadcasts the tied weights while it is
      constructed, which meta tensors cannot do, so each stage allocates its own layers as DeepSpeed builds them
      (from a meta model) and writes the initial weights of `pipeline_shapes["seed"]` into them.
    * otherwise on the meta device, then allocated for this rank's tensor-parallel shard only."""
    if zero_init is not None:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=zero_init, mpu=ctx.mpu), warnings.catch_warnings():
            # the constructors' own init calls meet already-partitioned (empty) tensors; their values are
            # replaced by the layout-independent initial weights right after
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            return ctx.build_model(model_config), False
    if ctx.pp_size == 1:
        return build_on_meta(ctx, model_config), True
    return ctx.build_model(model_config, loss_fn=pipeline_loss, **(pipeline_shapes or {})), False


def materialise(ctx, module: nn.Module, model_config, seed: int, is_meta: bool,
                fill: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """Allocate a meta module on the CPU and write its weights (the initial ones unless `fill` is given)."""
    from ofa_scale.model.init import InitialWeights
    from ofa_scale.parallel.allocate import allocate
    from ofa_scale.parallel.canonical import load_model_weights

    if is_meta:
        allocate(module)
    if fill is not None:
        fill(module)
    elif getattr(module, "initial_weights_seed", None) != seed:  # a pipeline stage wrote them while being built
        load_model_weights(ctx, module, InitialWeights(model_config, seed))
    return module


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every encoder/decoder layer's forward in backward (non-reentrant torch checkpointing); returns how
    many layers are wrapped. The instance's `forward` is replaced, not the module, so parameter names, state dicts
    and module hooks (ZeRO-3's gathers) are unchanged; calling it twice wraps nothing twice."""
    from torch.utils.checkpoint import checkpoint

    def recomputed(forward, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    count = 0
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        for layer in getattr(stack, "layers", None) or []:
            if not getattr(layer, CHECKPOINTED, False):
                layer.forward = functools.partial(recomputed, layer.forward)
                setattr(layer, CHECKPOINTED, True)
            count += 1
    if count == 0:
        raise ConfigError("parallel.activation_checkpointing found no encoder/decoder layers to checkpoint in this "
                          "model; set it to false")
    return count


def freeze_from_config(cfg, module: nn.Module) -> None:
    """Finetuning's train.freeze_* flags (finetune/freeze.py): requires_grad is set here, before DeepSpeed sees the
    parameters, so frozen ones never enter the optimizer."""
    t = cfg.train
    prompt = getattr(getattr(cfg, "model", None), "prompt_tuning", None)
    if prompt is not None and prompt.enabled:  # prompt tuning: only its own parameters train
        from ofa_scale.finetune.freeze import apply_prompt_freezing

        apply_prompt_freezing(module, prompt.kind)
    if t.freeze_encoder_embedding or t.freeze_decoder_embedding or t.freeze_resnet:
        from ofa_scale.finetune.freeze import apply_freezing

        apply_freezing(module, encoder_embedding=t.freeze_encoder_embedding,
                       decoder_embedding=t.freeze_decoder_embedding, resnet=t.freeze_resnet)


def compile_from_config(cfg, layout, module: nn.Module) -> nn.Module:
    """Step 5: `train.compile` (what: `train.compile_scope`) and `train.channels_last`."""
    if not (cfg.train.compile or cfg.train.channels_last):
        return module
    if layout.pp > 1:
        raise ConfigError("train.compile / train.channels_last are not supported with parallel.pp > 1 (the "
                          "pipeline engine calls its layers itself); set parallel.pp=1 or turn them off")
    from ofa_scale.parallel.compile import compile_model

    return compile_model(module, compile=cfg.train.compile, channels_last=cfg.train.channels_last,
                         scope=cfg.train.compile_scope)


def prepare_model(cfg, ctx, model_config, *, seed: int, device: torch.device, dtype: torch.dtype,
                  fill: Optional[Callable[[nn.Module], None]] = None,
                  pretrained: Optional[Callable[[nn.Module], None]] = None,
                  pipeline_loss: Optional[Callable] = None, pipeline_shapes: dict | None = None,
                  ds_config: Optional[dict] = None) -> nn.Module:
    """This rank's model, ready for `deepspeed.initialize` (see the module docstring for the steps)."""
    layout = ctx.layout
    zero_init = ds_config if layout.zero_stage == 3 and ds_config is not None else None
    module, is_meta = build_module(ctx, model_config, pipeline_loss=pipeline_loss, pipeline_shapes=pipeline_shapes,
                                   zero_init=zero_init)
    materialise(ctx, module, model_config, seed, is_meta, fill)
    if pretrained is not None and fill is None:
        pretrained(module)
    freeze_from_config(cfg, module)
    if layout.pp == 1 and layout.activation_checkpointing:
        apply_activation_checkpointing(module)
    module = compile_from_config(cfg, layout, module)
    if device.type != "cpu":
        module.to(device)
    if dtype != torch.float32:  # DeepSpeed casts parameters only; BatchNorm statistics must follow
        module.to(dtype)
    release_free_memory()  # the build's freed temporaries (initial-weight tensors, TP slices) stay resident otherwise
    return module

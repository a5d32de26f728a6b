"""OFA on DeepSpeed's PipelineModule: stage partitioning and the module itself.

Every rank builds the (TP-local) model on the meta device (nothing allocated) and carves it into pipeline layers;
DeepSpeed's PipelineModule builds only its own stage's layer specs, and a spec allocates its layer when built, so a
rank never holds more than its stage. The stage is then filled with the layout-independent initial weights
(model/init.py: each tensor from its own (seed, name) generator), so parameters equal the unsplit model's at the
same seed. Partitioning is over blocks (see
pipeline_layers): by forward FLOPs (default; an encoder layer over a long image sequence costs several decoder
layers, and the ResNet stem sits in the first block), by parameter count, uniformly, or as an explicit list.

DeepSpeed config this needs (merge `pipeline_ds_config()` into the engine's config): `pipe_partitioned` and
`grad_partitioned` off, because decoder stages pass several tensors that need gradients (states, encoder
output, biases), and DeepSpeed's partitioned mode handles only the first.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from torch import nn

from ofa_scale.parallel.allocate import allocate, is_meta
from ofa_scale.parallel.pipeline_layers import (
    DecoderEmbedPipe, DecoderLayerPipe, DecoderNormPipe, EncoderEmbedPipe, EncoderLayerPipe, SharedEmbedding,
    blocks_to_layers, carve)

TIED_KEY = "embed"


def pipeline_ds_config() -> dict:
    return {"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}


def stage_blocks(layout, model_cfg, image_size: int = 480, src_len: int = 128, tgt_len: int = 64) -> list[int]:
    """Blocks per pipeline stage for the layout's partition method (costs and split: parallel/stage_balance.py)."""
    from ofa_scale.parallel.stage_balance import balanced_split, block_costs

    if layout.partition == "explicit":
        return list(layout.stage_layers)
    return balanced_split(block_costs(model_cfg, layout.partition, image_size, src_len, tgt_len, layout.tp),
                          layout.pp)


@functools.cache
def _spec_classes() -> tuple[type, type]:
    """DeepSpeed's LayerSpec and TiedLayerSpec, allocating a layer carved from a meta model when it is built (the
    PipelineModule builds the specs of its own stage only)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    def allocated(module: nn.Module) -> nn.Module:
        return allocate(module) if is_meta(module) else module

    class AllocatingLayerSpec(LayerSpec):
        def build(self, log=False):
            return allocated(super().build(log))

    class AllocatingTiedLayerSpec(TiedLayerSpec):
        def build(self, log=False):
            return allocated(super().build(log))

    return AllocatingLayerSpec, AllocatingTiedLayerSpec


def build_layer_specs(model: nn.Module, factory) -> list:
    """The flat list of pipeline layers over a (TP-local) OFAModel, built or on the meta device; consumes the model.
    Layers carved from a meta model are allocated (uninitialised) when their spec is built."""
    LayerSpec, TiedLayerSpec = _spec_classes()  # noqa: N806

    parts = carve(model)
    specs: list[Any] = [
        TiedLayerSpec(TIED_KEY, SharedEmbedding, parts["embedding"], factory, tied_weight_attr="embedding.weight"),
        LayerSpec(EncoderEmbedPipe, parts["encoder"]),
    ]
    for i, (layer, (tok, img)) in enumerate(zip(parts["enc_layers"], parts["enc_tables"])):
        specs.append(LayerSpec(EncoderLayerPipe, layer, tok, img, i))
    specs.append(LayerSpec(DecoderEmbedPipe, parts["enc_norm"], parts["decoder"]))
    for i, (layer, (tok, img)) in enumerate(zip(parts["dec_layers"], parts["dec_tables"])):
        specs.append(LayerSpec(DecoderLayerPipe, layer, tok, img, i))
    specs.append(LayerSpec(DecoderNormPipe, parts["dec_norm"]))
    # the same module again (no forward_fn): its forward projects when handed the final states
    specs.append(TiedLayerSpec(TIED_KEY, SharedEmbedding, parts["embedding"], factory,
                               tied_weight_attr="embedding.weight"))
    return specs


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class OFAPipelineModule(PipelineModule):
        """PipelineModule whose stage boundaries come from our block partition (DeepSpeed's own methods only
        know uniform/parameters/type-regex)."""

        def __init__(self, layers, parts: list[int], **kwargs):
            self._ofa_parts = parts  # read by _partition_layers during PipelineModule.__init__
            super().__init__(layers, partition_method="ofa", **kwargs)

        def _partition_layers(self, method="ofa"):
            self.parts = list(self._ofa_parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return OFAPipelineModule


def build_pipeline_model(ctx, model_cfg, model_cls: Callable[..., nn.Module],
                         loss_fn: Optional[Callable] = None, seed: int = 0, image_size: int = 480,
                         src_len: int = 128, tgt_len: int = 64, dynamic_shape: bool = False) -> nn.Module:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from ofa_scale.model.init import InitialWeights
    from ofa_scale.parallel.canonical import load_model_weights

    layout = ctx.layout
    with torch.device("meta"):  # free: only the specs of this rank's stage are allocated, when DeepSpeed builds them
        model = model_cls(model_cfg, layers=ctx.layer_factory)
    if layout.tp > 1:
        from ofa_scale.parallel.context import mark_split_from_reference

        ctx.split_params = mark_split_from_reference(model, model_cfg, model_cls)
    blocks = stage_blocks(layout, model_cfg, image_size, src_len, tgt_len)
    per_stage = blocks_to_layers(blocks, model_cfg.encoder_layers, model_cfg.decoder_layers)
    parts = [0]
    for n in per_stage:
        parts.append(parts[-1] + n)
    specs = build_layer_specs(model, ctx.layer_factory)
    del model
    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    ckpt_kwargs = {}
    if layout.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        ckpt_kwargs = dict(activation_checkpoint_interval=1,
                           activation_checkpoint_func=lambda f, *a: checkpoint(f, *a, use_reentrant=False),
                           checkpointable_layers=["EncoderLayerPipe", "DecoderLayerPipe"])
    module = _pipeline_module_class()(specs, parts, topology=topology, loss_fn=loss_fn, dynamic_shape=dynamic_shape,
                                      **ckpt_kwargs)
    module.stage_blocks = blocks
    # DeepSpeed broadcast the tied embedding while constructing (uninitialised values); both ends now write the same
    load_model_weights(ctx, module, InitialWeights(model_cfg, seed))
    module.initial_weights_seed = seed  # training/prepare.py does not fill them a second time
    return module


def pipeline_named_parameters(module: nn.Module):
    """(OFA state-dict name, parameter) for every parameter this stage holds (tied embedding included once)."""
    for name, p in module.named_parameters():
        yield to_ofa_name(module, name), p


def to_ofa_name(module: nn.Module, name: str) -> str:
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        owner = module.tied_modules[key]
    else:
        owner = getattr(module, head)
    child, _, tail = rest.partition(".")
    prefix = owner.prefix_map[child]
    return f"{prefix}.{tail}" if tail else prefix

"""OFA on DeepSpeed's PipelineModule: stage partitioning and the module itself.

Every rank builds the (TP-local) model once with the same seed, so parameters equal the unsplit model's, then
keeps only its stage's layers (the rest are freed when the build returns). Partitioning is over blocks (see
pipeline_layers): by forward FLOPs (default; an encoder layer over a long image sequence costs several decoder
layers, and the ResNet stem sits in the first block), by parameter count, uniformly, or as an explicit list.

DeepSpeed config this needs (merge `pipeline_ds_config()` into the engine's config): `pipe_partitioned` and
`grad_partitioned` off, because decoder stages pass several tensors that need gradients (states, encoder
output, biases), and DeepSpeed's partitioned mode handles only the first.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

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


def build_layer_specs(model: nn.Module, factory) -> list:
    """The flat list of pipeline layers over a built (TP-local) OFAModel; consumes the model."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

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

    layout = ctx.layout
    # same seed on every rank -> the kept layers hold the same values as in the unsplit model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
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

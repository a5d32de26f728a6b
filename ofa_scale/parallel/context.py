"""`setup_parallel(layout)`: process groups for a validated Layout, and the objects the trainer needs from them.

Call after torch.distributed is initialised (deepspeed.init_distributed / torchrun). It initialises megatron-core's
parallel_state with the layout's TP and PP sizes and returns a ParallelContext: the ranks, DeepSpeed's `mpu`, the
layer factory, a model builder and the loss on (possibly vocabulary-split) logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ofa_scale.parallel.layout import Layout
from ofa_scale.objectives.token_loss import TokenLosses, make_token_loss


@dataclass
class ParallelContext:
    layout: Layout
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    mpu: Any  # MegatronMPU (pp == 1); with pp > 1 DeepSpeed uses the PipelineModule's own grid instead
    layer_factory: Any
    tp_group: Any = None
    dp_group: Any = None
    split_params: dict[str, int] = field(default_factory=dict)  # name -> split dim, filled by build_model

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    def vocab_range(self) -> tuple[int, int]:
        per = self.layout.padded_vocab_size // self.layout.tp
        return self.tp_rank * per, (self.tp_rank + 1) * per

    # -- model -------------------------------------------------------------------------------------------------
    def build_model(self, model_cfg: Any, model_cls: Optional[Callable[..., nn.Module]] = None,
                    loss_fn: Optional[Callable] = None, seed: int = 0, image_size: int = 480, src_len: int = 128,
                    tgt_len: int = 64, dynamic_shape: bool = False) -> nn.Module:
        """The OFA model for this rank: an nn.Module (pp == 1) or a DeepSpeed PipelineModule (pp > 1).

        Pipeline only: `loss_fn(logits, labels) -> scalar` runs on the last stage; every rank builds the model
        from `seed` (so stages hold the unsplit model's values); image_size/src_len/tgt_len are the micro-batch
        shapes the FLOP-balanced partition is computed for; `dynamic_shape` lets micro-batches of different shapes
        (e.g. the image-text and auxiliary groups) share one pipeline, at the cost of a shape exchange per send."""
        if model_cls is None:
            from ofa_scale.model import OFAModel as model_cls  # noqa: N813
        if self.layout.pp > 1:
            from ofa_scale.parallel.pipeline import build_pipeline_model

            return build_pipeline_model(self, model_cfg, model_cls, loss_fn, seed=seed, image_size=image_size,
                                        src_len=src_len, tgt_len=tgt_len, dynamic_shape=dynamic_shape)
        model = model_cls(model_cfg, layers=self.layer_factory)
        if self.layout.tp > 1:
            self.split_params = mark_split_from_reference(model, model_cfg, model_cls)
        return model

    # -- loss --------------------------------------------------------------------------------------------------
    def token_losses(self, logits: torch.Tensor, target: torch.Tensor, *, epsilon: float, ignore_index: int,
                     conf: Optional[torch.Tensor] = None, constraint_masks: Optional[torch.Tensor] = None,
                     constraint_range: Optional[tuple[int, int]] = None) -> TokenLosses:
        """Per-token label-smoothed loss on this rank's logits (vocabulary-split when tp > 1), by the TokenLoss
        `make_token_loss` hands out for this context (objectives/token_loss.py)."""
        token_loss = make_token_loss(self, epsilon, ignore_index)
        return token_loss(logits, target, conf=conf, constraint_masks=constraint_masks,
                          constraint_range=constraint_range)

    def loss_fn(self, logits: torch.Tensor, batch: dict, *, epsilon: float = 0.1, ignore_index: int = 1
                ) -> torch.Tensor:
        """Sum of per-token losses over the micro-batch (the trainer normalises by its token count)."""
        out = self.token_losses(logits, batch["target"], epsilon=epsilon, ignore_index=ignore_index,
                                conf=batch.get("conf"), constraint_masks=batch.get("constraint_masks"))
        return out.loss.sum()


def mark_split_from_reference(model: nn.Module, model_cfg: Any, model_cls) -> dict[str, int]:
    """Compare with the unsplit model built on the meta device (free) and mark every split parameter."""
    from ofa_scale.model.layers import LayerFactory
    from ofa_scale.parallel.tensor_parallel import mark_split_parameters

    with torch.device("meta"):
        reference = model_cls(model_cfg, layers=LayerFactory())
    shapes = {n: p.shape for n, p in reference.named_parameters()}
    return mark_split_parameters(model, shapes)


def setup_parallel(layout: Layout, seed: Optional[int] = None) -> ParallelContext:
    """Initialise megatron-core parallel_state for `layout` and return this rank's ParallelContext."""
    from megatron.core import parallel_state

    from ofa_scale.parallel.mpu import MegatronMPU

    if not dist.is_initialized():
        raise RuntimeError("setup_parallel needs torch.distributed initialised first (deepspeed.init_distributed)")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise RuntimeError(f"layout was validated for {layout.world_size} processes but the world has {world}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        create_gloo_process_groups=False)
    if seed is not None and torch.cuda.is_available() and layout.tp > 1:
        # megatron's RNG tracker gives TP ranks distinct dropout streams inside split regions (GPU only; on CPU
        # runs stay on the plain torch RNG, identical across TP ranks)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    mpu = MegatronMPU()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank()
    coords = layout.coords(rank)
    assert coords["tp"] == mpu.get_tensor_model_parallel_rank(), "rank order disagrees with megatron-core"
    assert coords["dp"] == mpu.get_data_parallel_rank(), "rank order disagrees with megatron-core"
    if layout.tp > 1:
        from ofa_scale.parallel.tensor_parallel import TensorParallelLayerFactory

        factory = TensorParallelLayerFactory(layout.tp, coords["tp"], tp_group, layout.padded_vocab_size)
    else:
        from ofa_scale.model.layers import LayerFactory

        factory = LayerFactory()
    return ParallelContext(layout=layout, rank=rank, tp_rank=coords["tp"], pp_rank=coords["pp"],
                           dp_rank=coords["dp"], mpu=mpu, layer_factory=factory, tp_group=tp_group,
                           dp_group=parallel_state.get_data_parallel_group())


def teardown_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()

"""torch.compile for training: each encoder/decoder layer and each Bottleneck block of the ResNet stem compiled on
its own (torchtitan's per-block compile), and optionally the stem in channels-last memory format.

Why per block: blocks that run the same code on the same shapes share one compiled graph (dynamo guards on shapes
and on the block's Python constants such as its drop-path rate, not on which block it is), so compile time grows
with the number of distinct blocks, not with depth: the 13 Bottlenecks of a ResNet-50 stem need 6 graphs, a
whole-stem graph took minutes longer to compile on 2 cores. The code between blocks (the stem's first conv and
max-pool, embeddings, relative-position biases, the loss) stays eager.

Why the instance's `forward` is replaced rather than `module.compile()`: `module.compile()` compiles `_call_impl`,
so the module's hooks would run inside the compiled region. ZeRO-3 fetches and releases parameters in such hooks
(all-gathers and Python bookkeeping that dynamo cannot trace). Compiling `forward` keeps every hook of the block
itself eager around the graph; and under ZeRO-3 each compiled block is marked a "leaf module" (DeepSpeed's
`set_z3_leaf_modules`), so DeepSpeed gathers all of the block's parameters in the block's own hook and installs
no hooks on its children, which would otherwise run inside the graph. Parameter names, state-dict keys and their
order do not change (nothing is wrapped), so checkpoints are layout- and compile-free.

Activation checkpointing: the trainer wraps `layer.forward` in non-reentrant `torch.utils.checkpoint` first; the
wrapper is compiled as it is (dynamo turns the checkpoint into a recomputed region of the same graph, as torchtitan
does with checkpoint-then-compile).

Channels-last: every image is converted to NHWC as it enters the stem, and oneDNN (CPU) / cuDNN (GPU) then run
each convolution in the layout of its input, so the whole stem (convolutions, BatchNorms, ReLUs, residual adds)
stays NHWC and its output's flatten + transpose into patch tokens is free. The weights keep their layout:
DeepSpeed views every parameter as flat bytes (broadcast, ZeRO buffers), which a channels-last weight refuses.

On CPU the stem's blocks are better left eager (benchmarks/model_step.py, ofa_tiny, batch 8, 256 px): inductor's
generated code for the train-mode BatchNorm/ReLU/residual forward and backward takes more time than ATen's kernels
it replaces (the convolutions are the same oneDNN calls either way), so compiling the stem is 1.17× the eager step
in CPU time with channels-last, while the transformer layers alone compile to about the eager time. The fastest CPU
step is channels-last with `scope="transformer"` (`train.compile_scope: transformer`, `train.channels_last: true`);
the trainer's default stays `all`, which is what GPUs are expected to need (benchmarks/gpu_check.py measures both
there).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ofa_scale.errors import ConfigError
from ofa_scale.training.config import COMPILE_SCOPES


SCOPES = COMPILE_SCOPES  # train.compile_scope


def compiled_block_types(scope: str = "all") -> tuple[type, ...]:
    """The module classes compiled one graph each: the transformer layers and/or the stem's Bottleneck blocks."""
    from ofa_scale.model.blocks import DecoderLayer, EncoderLayer
    from ofa_scale.model.resnet import Bottleneck

    if scope not in SCOPES:
        raise ConfigError(f"compile scope '{scope}' is not one of {', '.join(SCOPES)}")
    return {"all": (EncoderLayer, DecoderLayer, Bottleneck), "transformer": (EncoderLayer, DecoderLayer),
            "stem": (Bottleneck,)}[scope]


def require_compiler() -> None:
    """Fail with one sentence where torch.compile cannot work (no dynamo for this Python, no C++ compiler)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("train.compile=true needs torch.compile, which this Python/torch build does not support; "
                          "set train.compile=false")
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # the search raises a bare RuntimeError naming the compilers it tried
        raise ConfigError(f"train.compile=true needs a C++ compiler for torch.compile's generated code "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'none found'}); install "
                          f"g++ or set CXX, or set train.compile=false") from None


def _channels_last_input(forward, images: torch.Tensor, *args, **kwargs):
    return forward(images.contiguous(memory_format=torch.channels_last), *args, **kwargs)


def compile_model(model: nn.Module, *, compile: bool = True, channels_last: bool = False,  # noqa: A002
                  scope: str = "all") -> nn.Module:
    """With `compile`, compile every encoder/decoder layer and stem block of `model` in place (any module holding
    an OFA model; `scope` "transformer" or "stem" compiles only those, for benchmarks/model_step.py to tell the two
    apart); with `channels_last`, run the stem NHWC. Returns `model` (the same object)."""
    from ofa_scale.model.resnet import ResNetStem

    blocks = [m for m in model.modules() if isinstance(m, compiled_block_types(scope))]
    if not blocks:
        raise ConfigError("train.compile/train.channels_last found no OFA encoder/decoder layer or ResNet stem in "
                          "this model; set both to false")
    if channels_last:
        for stem in (m for m in model.modules() if isinstance(m, ResNetStem)):
            if getattr(stem, "_ofa_channels_last", False):
                continue
            stem.forward = functools.partial(_channels_last_input, stem.forward)
            stem._ofa_channels_last = True
    if not compile:
        return model
    require_compiler()
    _mark_zero3_leaves(blocks)
    for block in blocks:
        if getattr(block, "_ofa_compiled", False):
            continue
        # dynamic=False: the trainer's batches have a few fixed shapes (one per batch group), each compiled once
        # with static shapes, rather than one slower symbolic-shape graph
        block.forward = torch.compile(block.forward, dynamic=False)
        block._ofa_compiled = True
    _raise_recompile_limit(len(blocks))
    return model


def _mark_zero3_leaves(blocks: list[nn.Module]) -> None:
    """Mark each block a ZeRO-3 leaf (harmless under ZeRO-1/2 and without DeepSpeed: an attribute only)."""
    try:
        from deepspeed.utils import set_z3_leaf_module
    except ImportError:  # plain torch (benchmarks, tests without DeepSpeed): nothing to mark
        return
    for block in blocks:
        set_z3_leaf_module(block, True)


def _raise_recompile_limit(n_blocks: int) -> None:
    """Dynamo's recompile limit counts graphs per code object, across all layers sharing it. Each batch group
    (image-text, auxiliary) has its own shapes, and masks that are None for one batch and a tensor for another
    add variants, and each distinct drop-path rate (a constant in the graph) another; allow a few per block so no
    block silently falls back to eager."""
    import torch._dynamo.config as dynamo_config

    wanted = max(int(dynamo_config.recompile_limit), 4 * n_blocks)
    dynamo_config.recompile_limit = wanted
    dynamo_config.accumulated_recompile_limit = max(int(dynamo_config.accumulated_recompile_limit), 4 * wanted)

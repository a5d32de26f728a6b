"""Allocate a module that was built on the meta device, keeping what `nn.Module.to_empty` would lose.

Used for every build that defers allocation: a tensor-parallel rank's shard (training/prepare.py) and each layer a
pipeline stage keeps (parallel/pipeline.py). The values are left uninitialised except the index buffers, which
are functions of the config; the caller writes the weights (the layout-independent initial ones or a checkpoint's).
"""

from __future__ import annotations

import itertools

from torch import nn


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def allocate(module: nn.Module, device="cpu") -> nn.Module:
    """`module.to_empty(device)`, then restore the tied embedding, the parameters' attributes and the index buffers.

    to_empty gives every module new Parameter objects: the attributes megatron-core and our TP marking put on
    parameters (tensor_model_parallel, partition_dim, …, which DeepSpeed's gradient norm reads) would be lost, and
    the shared embedding would be untied from the output projection that reads it."""
    from ofa_scale.model.decoder import OFADecoder
    from ofa_scale.model.encoder import OFAEncoder

    marks = {name: dict(vars(p)) for name, p in module.named_parameters()}
    module.to_empty(device=device)
    tie = getattr(module, "tie_embeddings", None)
    if tie is not None:
        tie()
    for name, p in module.named_parameters():
        for attr, value in marks.get(name, {}).items():
            setattr(p, attr, value)
    for sub in module.modules():  # index tables are functions of the config, never weights
        if isinstance(sub, (OFAEncoder, OFADecoder)):
            sub.reset_index_buffers()
    return module

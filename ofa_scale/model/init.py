"""Initial weights keyed by parameter name, so any layout can make its own shard without building the model.

Why not the usual "seed the global RNG, construct, init in module order": with that scheme a parameter's initial
value depends on every random draw before it, so a tensor-parallel rank, a pipeline stage or a ZeRO-3 partition can
only reproduce the single-process model by building (or replaying) all of it. Here every tensor is drawn from its
own generator seeded by (run seed, its OFA state-dict name), so `initial_value(name)` is the same full tensor in
every process and layout, and a rank keeps only its slice. The distributions are OFA's (spec §4.8, fairseq's
`init_bert_params` plus torchvision's ResNet init):

* Linear and Embedding weights ~ N(0, init_std), Linear biases 0, the padding row of an Embedding 0 (this also
  covers the relative-position tables: OFA's zero init of them is overridden by init_bert_params);
* Conv2d weights: Kaiming normal (fan_out, ReLU);
* BatchNorm and LayerNorm: weight 1, bias 0; BatchNorm running mean 0, variance 1, batch count 0;
* `c_attn` (head scales): 1.

Index buffers (`*_rp_bucket`, `image_position_idx`, `version`) are not initial values: the model recomputes them.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterator, Mapping

import torch
from torch import nn

INDEX_BUFFERS = ("token_rp_bucket", "image_rp_bucket", "image_position_idx", "version")


def _seed(seed: int, name: str) -> int:
    """63-bit seed from the run seed and a name (crc32 keeps it stable across processes and Python versions)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 29)) & 0x7FFFFFFFFFFFFFFF


def _kind(module: nn.Module, attr: str) -> str:
    cls = type(module).__name__
    if isinstance(module, nn.Linear):
        return "normal" if attr == "weight" else "zeros"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "kaiming" if attr == "weight" else "zeros"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or "LayerNorm" in cls:
        return {"weight": "ones", "bias": "zeros", "running_mean": "zeros", "running_var": "ones",
                "num_batches_tracked": "zeros"}[attr]
    if attr == "c_attn":
        return "ones"
    # OFA-OCR's ViT stem (model/vit_stem.py): nn.MultiheadAttention's packed q/k/v projection and the positional
    # table are bare parameters; they get the Linear/Embedding rules
    if attr in ("in_proj_weight", "positional_embedding"):
        return "normal"
    if attr == "in_proj_bias":
        return "zeros"
    raise TypeError(f"no initialisation rule for {cls}.{attr}; add one to ofa_scale/model/init.py")


class InitialWeights(Mapping[str, torch.Tensor]):
    """A lazy {OFA name: full fp32 initial tensor} for a plain (tp=1) model's parameters and BatchNorm statistics.

    Built from the plain model on the meta device (free); a value is computed when looked up and not kept, so
    peak memory is one tensor.
    """

    def __init__(self, config, seed: int):
        from ofa_scale.model.ofa import OFAModel

        with torch.device("meta"):
            reference = OFAModel(config)
        self.std = config.init_std
        self.seed = seed
        self._entries: dict[str, tuple[str, torch.Size, torch.dtype, int | None]] = {}
        # named_parameters() lists a tied parameter once, under its first owner (encoder.embed_tokens)
        tensors = list(reference.named_parameters()) + [
            (n, b) for n, b in reference.named_buffers() if n.rsplit(".", 1)[-1] not in INDEX_BUFFERS]
        for name, t in tensors:
            owner_name, _, attr = name.rpartition(".")
            module = reference.get_submodule(owner_name)
            padding = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
            self._entries[name] = (_kind(module, attr), t.shape, t.dtype, padding)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> torch.Size:
        return self._entries[name][1]

    def __getitem__(self, name: str) -> torch.Tensor:
        kind, shape, dtype, padding = self._entries[name]
        if kind == "ones":
            return torch.ones(shape, dtype=dtype)
        if kind == "zeros":
            return torch.zeros(shape, dtype=dtype)
        gen = torch.Generator().manual_seed(_seed(self.seed, name))
        if kind == "kaiming":  # fan_out, gain sqrt(2) (ReLU), as torchvision's ResNet
            fan_out = shape[0] * math.prod(shape[2:])
            return torch.empty(shape).normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
        value = torch.empty(shape).normal_(0.0, self.std, generator=gen)
        if kind == "embedding" and padding is not None:
            value[padding] = 0.0
        return value


def init_weights(model: nn.Module, seed: int) -> None:
    """Set a plain (tp=1, whole) OFAModel's parameters and BatchNorm statistics to `InitialWeights(seed)`."""
    weights = InitialWeights(model.config, seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in weights:
                t.copy_(weights[name])

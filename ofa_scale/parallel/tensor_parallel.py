"""Tensor parallelism for OFA through the model's layer factory, on megatron-core's parallel layers.

The model asks its factory for every layer whose weight is split (docs/interfaces.md §5); this factory answers
with megatron-core ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding, trimmed to return plain
tensors like nn.Linear does, so the same model code runs at tp=1 and tp=8.

Why the replicated parts (ResNet stem, LayerNorms, position tables) need no extra gradient all-reduce: every TP
rank computes them on the same input, and their gradients arrive through the column-parallel layers, whose input
gradient megatron all-reduces over the TP group. Their gradients are therefore identical on every TP rank (tested).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ofa_scale.parallel import collectives

INIT_STD = 0.02  # fairseq init_bert_params: every Linear/Embedding weight ~ N(0, 0.02)


def _normal_init(weight: torch.Tensor) -> None:
    nn.init.normal_(weight, mean=0.0, std=INIT_STD)


def mark_tensor_parallel(param: torch.nn.Parameter, dim: int) -> None:
    """Mark a parameter as split over TP (megatron's attributes; DeepSpeed counts it on every rank in norms)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group where every rank's output feeds a *different* downstream computation (distributed
    LayerNorm statistics): the adjoint of a sum that every rank consumes is again a sum."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return collectives.all_reduce(x.clone(), "sum", group)

    @staticmethod
    def backward(ctx, grad):
        return collectives.all_reduce(grad.clone(), "sum", ctx.group), None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


class DistributedLayerNorm(nn.Module):
    """LayerNorm over a feature dimension that is split across TP ranks (OFA's ffn_layernorm sits between fc1,
    column-split, and fc2, row-split). Statistics are all-reduced; weight and bias hold the local slice."""

    def __init__(self, full_dim: int, tp_size: int, group, eps: float = 1e-5):
        super().__init__()
        self.full_dim = full_dim
        self.group = group
        self.eps = eps
        local = full_dim // tp_size
        self.weight = nn.Parameter(torch.ones(local))
        self.bias = nn.Parameter(torch.zeros(local))
        mark_tensor_parallel(self.weight, 0)
        mark_tensor_parallel(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # Two passes (mean, then centred squares) like a local LayerNorm, to keep fp32 results close to it.
        mean = all_reduce_sum(xf.sum(-1, keepdim=True), self.group) / self.full_dim
        centred = xf - mean
        var = all_reduce_sum((centred * centred).sum(-1, keepdim=True), self.group) / self.full_dim
        y = centred * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)


def _megatron_classes():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class ColumnLinear(ColumnParallelLinear):
        """ColumnParallelLinear returning only the local output slice (like nn.Linear returns a tensor)."""

        def forward(self, x):  # noqa: D401
            out, _ = super().forward(x)
            return out

    class RowLinear(RowParallelLinear):
        """RowParallelLinear (input split, output summed over TP) returning a tensor."""

        def forward(self, x):
            out, _ = super().forward(x)
            return out

    class VocabEmbedding(VocabParallelEmbedding):
        """VocabParallelEmbedding with nn.Embedding's padding_idx semantics: the lookup of the padding id adds
        no gradient to its row (the tied output projection still does, as in fairseq)."""

        def __init__(self, *args, padding_idx=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.padding_idx = padding_idx

        def forward(self, ids):
            out = super().forward(ids)
            if self.padding_idx is not None:
                out = torch.where((ids == self.padding_idx).unsqueeze(-1), out.detach(), out)
            return out

    return ColumnLinear, RowLinear, VocabEmbedding


class TensorParallelLayerFactory:
    """The model's layer factory for tp > 1 (also valid at tp == 1, where it builds megatron layers of full size).

    `padded_vocab_size` is the layout's vocabulary rounded up to a multiple of tp; `vocab_embedding` ignores the
    `num` it is asked for beyond checking it, so the padded rows exist on the last rank and are masked in the loss.
    """

    def __init__(self, tp_size: int, tp_rank: int, group, padded_vocab_size: int | None = None,
                 params_dtype: torch.dtype = torch.float32):
        from megatron.core import ModelParallelConfig

        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.group = group
        self.padded_vocab_size = padded_vocab_size
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=tp_size, use_cpu_initialization=True, perform_initialization=True,
            params_dtype=params_dtype, sequence_parallel=False)
        self._column, self._row, self._vocab = _megatron_classes()
        # Inference (generation, all-candidate scoring) needs every vocabulary entry on every rank: beam search,
        # tries and constraint ranges index the real vocabulary. `full_vocabulary_logits` turns this on.
        self.full_logits = False
        self.real_vocab_size: int | None = None

    # -- what the model asks for ------------------------------------------------------------------------------
    def column_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return self._column(in_features, out_features, config=self.config, init_method=_normal_init, bias=bias,
                            gather_output=False, tp_group=self.group)

    def row_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return self._row(in_features, out_features, config=self.config, init_method=_normal_init, bias=bias,
                         input_is_parallel=True, skip_bias_add=False, tp_group=self.group)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        layer = nn.Linear(in_features, out_features, bias=bias)
        _normal_init(layer.weight)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer

    def vocab_embedding(self, num: int, dim: int, padding_idx: int | None = None) -> nn.Module:
        total = self.padded_vocab_size or num
        if total < num or total % self.tp_size:
            raise ValueError(f"padded vocabulary {total} must be >= {num} and divisible by tp={self.tp_size}")
        emb = self._vocab(total, dim, init_method=_normal_init, config=self.config, tp_group=self.group,
                          padding_idx=padding_idx)
        emb.real_num_embeddings = num
        self.real_vocab_size = num
        if padding_idx is not None and emb.vocab_start_index <= padding_idx < emb.vocab_end_index:
            with torch.no_grad():  # fairseq zeroes the padding row at init
                emb.weight[padding_idx - emb.vocab_start_index].zero_()
        return emb

    def output_logits(self, x: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        """Tied projection onto this rank's vocabulary slice: (…, d) -> (…, V_padded / tp)."""
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        if self.tp_size > 1:  # identity forward; backward sums the input gradient over TP
            x = copy_to_tensor_model_parallel_region(x, group=self.group)
        logits = F.linear(x, embedding.weight)
        if not self.full_logits:
            return logits
        if self.tp_size > 1:
            if logits.requires_grad:
                raise RuntimeError("full_vocabulary_logits is for inference (generation, candidate scoring): run it "
                                   "under torch.no_grad(); training takes the vocabulary-split logits")
            # not megatron's gather: it allocates on torch.cuda.current_device() (so CPU runs fail) and bypasses
            # the collectives module's device check
            logits = torch.cat(collectives.all_gather(logits, self.group), dim=-1)
        # the padded rows (vocabulary rounded up to a multiple of tp) are not tokens
        return logits[..., :self.real_vocab_size] if self.real_vocab_size else logits

    def ffn_layernorm(self, dim: int, eps: float = 1e-5) -> nn.Module:
        if self.tp_size == 1:
            return nn.LayerNorm(dim, eps=eps)
        return DistributedLayerNorm(dim, self.tp_size, self.group, eps=eps)

    # -- helpers for modules that split by head themselves --------------------------------------------------------
    def local_heads(self, heads: int) -> int:
        if heads % self.tp_size:
            raise ValueError(f"{heads} heads do not split over tp={self.tp_size}")
        return heads // self.tp_size

    def vocab_range(self) -> tuple[int, int]:
        """[start, end) of the padded vocabulary this rank's logits cover."""
        per = (self.padded_vocab_size or 0) // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per


@contextlib.contextmanager
def full_vocabulary_logits(model: nn.Module):
    """Within this block the model's logits cover the whole real vocabulary on every tensor-parallel rank
    (gathered over the TP group, padding rows cut), as generation and candidate scoring need; training keeps the
    vocabulary-split logits of the vocab-parallel loss. A no-op for a model built without the TP factory."""
    factories = {id(f): f for f in (getattr(m, "factory", None) for m in model.modules())
                 if isinstance(f, TensorParallelLayerFactory)}
    before = {k: f.full_logits for k, f in factories.items()}
    for f in factories.values():
        f.full_logits = True
    try:
        yield model
    finally:
        for k, f in factories.items():
            f.full_logits = before[k]


def mark_split_parameters(model: nn.Module, full_shapes: dict[str, torch.Size]) -> dict[str, int]:
    """Mark every parameter whose local shape differs from the unsplit model's as tensor-parallel.

    Catches what the model splits by head on its own (relative-position tables, c_attn). Returns
    {name: split_dim} for every split parameter (megatron layers included)."""
    split: dict[str, int] = {}
    for name, p in model.named_parameters():
        full = full_shapes.get(name)
        if full is None:
            raise KeyError(f"parameter {name} is not in the unsplit model; the TP and plain builds disagree")
        dims = [d for d, (a, b) in enumerate(zip(p.shape, full)) if a != b]
        if len(p.shape) != len(full) or len(dims) > 1:
            raise ValueError(f"parameter {name}: local shape {tuple(p.shape)} vs full {tuple(full)} is not a 1-D split")
        if dims:
            if not getattr(p, "tensor_model_parallel", False):
                mark_tensor_parallel(p, dims[0])
            split[name] = dims[0]
        elif getattr(p, "tensor_model_parallel", False):
            split[name] = getattr(p, "partition_dim", 0)
    return split


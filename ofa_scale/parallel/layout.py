"""The `parallel:` config section and its validation into a concrete Layout.

Everything here is pure: it runs before any process group exists, so a bad layout fails in the launcher's first
second with one sentence naming the fix, not minutes later inside a collective.

Rank order (fastest-varying first) is tp → dp → pp, the order megatron-core's `parallel_state` ("tp-cp-ep-dp-pp")
and DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model) both use, so the groups the two libraries
build over the same world coincide.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ofa_scale.errors import ConfigError

PartitionMethod = Literal["flops", "parameters", "uniform", "explicit"]


@dataclass
class ParallelConfig:
    """The `parallel:` section of the training config."""

    tp: int = 1  # tensor-parallel size (megatron-core), splits heads, FFN and vocabulary
    pp: int = 1  # pipeline stages (DeepSpeed PipelineModule)
    dp: Optional[int] = None  # derived as world // (tp*pp); when set it is only checked
    zero_stage: int = 1
    sequence_parallel: bool = False  # megatron sequence parallel in LN/dropout regions (GPU only)
    activation_checkpointing: bool = False  # recompute each transformer layer in backward
    micro_batches: int = 1  # micro-batches per optimizer step (gradient accumulation; the PP schedule length)
    partition: PartitionMethod = "flops"  # how pipeline stages are balanced
    stage_layers: list[int] = field(default_factory=list)  # explicit layers per stage for partition=explicit
    vocab_multiple: int = 1  # pad the vocabulary to a multiple of tp*vocab_multiple (128 helps GPU matmuls)

    def validate(self) -> None:
        for name in ("tp", "pp", "micro_batches", "vocab_multiple"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"parallel.{name} is {value}; set it to a positive integer")
        if self.dp is not None and self.dp < 1:
            raise ConfigError(f"parallel.dp is {self.dp}; set it to a positive integer or leave it out (derived)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage is {self.zero_stage}; use 0, 1, 2 or 3")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} cannot be combined with pipeline parallelism "
                f"(pp={self.pp}): DeepSpeed pipelines support ZeRO-0/1 only; set parallel.zero_stage=1 or parallel.pp=1")
        if self.pp > 1 and self.zero_stage == 0:
            # DeepSpeed's non-ZeRO gradient clipping counts replicated parameters only on the first rank of the
            # whole pipeline x tensor group, so later stages' parameters drop out of the norm (measured: losses
            # leave the single-process run by 1e-4 within 3 steps); its ZeRO-1 path counts them correctly
            raise ConfigError("parallel.zero_stage=0 with pipeline parallelism clips gradients with a wrong norm in "
                              "DeepSpeed; set parallel.zero_stage=1 (same memory for parameters and gradients)")
        if self.partition == "explicit" and not self.stage_layers:
            raise ConfigError("parallel.partition=explicit needs parallel.stage_layers (layers per stage, e.g. [5, 3])")
        if self.stage_layers and self.partition != "explicit":
            raise ConfigError("parallel.stage_layers is only used with parallel.partition=explicit; set both or neither")


@dataclass(frozen=True)
class ModelShape:
    """The model sizes that constrain a layout (read from the model config)."""

    embed_dim: int
    ffn_dim: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    vocab_size: int


# Names the model config may use for each size; the first present wins. The model package owns the config,
# so we read it by duck typing rather than importing its class.
_SHAPE_NAMES = {
    "embed_dim": ("embed_dim", "d_model", "encoder_embed_dim", "hidden_size", "hidden"),
    "ffn_dim": ("ffn_dim", "ffn_embed_dim", "encoder_ffn_embed_dim", "ffn", "ffn_hidden_size"),
    "heads": ("heads", "num_heads", "attention_heads", "encoder_attention_heads", "num_attention_heads"),
    "encoder_layers": ("encoder_layers", "enc_layers", "num_encoder_layers"),
    "decoder_layers": ("decoder_layers", "dec_layers", "num_decoder_layers"),
    "vocab_size": ("vocab_size", "num_embeddings", "vocab"),
}


def model_shape(model_cfg: Any) -> ModelShape:
    """Extract a ModelShape from the model config (a dataclass, a dict or an object with attributes)."""
    if isinstance(model_cfg, ModelShape):
        return model_cfg
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d=None: getattr(model_cfg, k, d)
    values = {}
    for key, names in _SHAPE_NAMES.items():
        for name in names:
            value = get(name, None)
            if value is not None:
                values[key] = int(value)
                break
        else:
            raise ConfigError(f"model config has no {key} (looked for {', '.join(names)}); this is a bug of ours")
    return ModelShape(**values)


def pad_vocab(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Smallest size >= vocab_size divisible by tp*multiple; the extra rows never win a softmax (masked)."""
    step = tp * multiple
    return -(-vocab_size // step) * step


@dataclass(frozen=True)
class Layout:
    """A validated layout: sizes of every axis plus the derived numbers the rest of the code needs."""

    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    sequence_parallel: bool
    activation_checkpointing: bool
    micro_batches: int
    partition: str
    stage_layers: tuple[int, ...]
    vocab_size: int  # the model's real vocabulary
    padded_vocab_size: int  # rows the shared embedding actually has (divisible by tp)
    shape: ModelShape

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def coords(self, rank: int) -> dict[str, int]:
        """(tp, dp, pp) coordinates of a global rank (tp fastest, then dp, then pp)."""
        return {"tp": rank % self.tp, "dp": (rank // self.tp) % self.dp, "pp": rank // (self.tp * self.dp)}

    def describe(self) -> str:
        pad = (f", vocab padded {self.vocab_size}->{self.padded_vocab_size}"
               if self.padded_vocab_size != self.vocab_size else "")
        return (f"world={self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp}, ZeRO-{self.zero_stage}, "
                f"micro_batches={self.micro_batches}{pad}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stage_layers"] = list(self.stage_layers)
        return d


def validate_layout(parallel_cfg: ParallelConfig, model_cfg: Any, world_size: int) -> Layout:
    """Check a parallel config against the model and the world size; return the Layout or raise ConfigError."""
    cfg = parallel_cfg
    cfg.validate()
    shape = model_shape(model_cfg)
    tp, pp = cfg.tp, cfg.pp
    if world_size < 1:
        raise ConfigError(f"world size is {world_size}; launch at least one process")
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} processes or change parallel.tp/parallel.pp")
    dp = world_size // (tp * pp)
    if cfg.dp is not None and cfg.dp != dp:
        raise ConfigError(
            f"world size {world_size} is not tp*pp*dp = {tp}*{pp}*{cfg.dp} = {tp * pp * cfg.dp}; "
            f"launch {tp * pp * cfg.dp} processes or drop parallel.dp (it is derived as {dp})")
    if shape.heads % tp != 0:
        raise ConfigError(f"{shape.heads} attention heads are not divisible by parallel.tp={tp}; "
                          f"choose tp among {_divisors(shape.heads)}")
    if shape.ffn_dim % tp != 0:
        raise ConfigError(f"FFN width {shape.ffn_dim} is not divisible by parallel.tp={tp}; "
                          f"choose tp among {_divisors(shape.ffn_dim)}")
    if shape.embed_dim % tp != 0:
        raise ConfigError(f"model width {shape.embed_dim} is not divisible by parallel.tp={tp}; "
                          f"choose tp among {_divisors(shape.embed_dim)}")
    total_layers = shape.encoder_layers + shape.decoder_layers
    if pp > total_layers:
        raise ConfigError(f"parallel.pp={pp} is larger than the model's {total_layers} transformer layers "
                          f"({shape.encoder_layers} encoder + {shape.decoder_layers} decoder); use pp <= {total_layers}")
    if cfg.stage_layers:
        from ofa_scale.parallel.pipeline_layers import num_pipeline_layers

        n = num_pipeline_layers(shape.encoder_layers, shape.decoder_layers)
        if len(cfg.stage_layers) != pp or sum(cfg.stage_layers) != n or min(cfg.stage_layers) < 1:
            raise ConfigError(
                f"parallel.stage_layers={list(cfg.stage_layers)} must list {pp} positive counts summing to the "
                f"{n} pipeline layers (embedding + {total_layers} transformer layers + decoder embedding + head)")
    if cfg.sequence_parallel:
        # megatron's sequence parallel needs the model's LayerNorm/dropout regions re-cut along the sequence and
        # its CUDA RNG tracker; neither is wired into OFA's encoder/decoder yet
        raise ConfigError("parallel.sequence_parallel is not supported yet (tensor parallel runs without it); "
                          "set parallel.sequence_parallel=false")
    padded = pad_vocab(shape.vocab_size, tp, cfg.vocab_multiple)
    return Layout(
        world_size=world_size, tp=tp, pp=pp, dp=dp, zero_stage=cfg.zero_stage,
        sequence_parallel=cfg.sequence_parallel, activation_checkpointing=cfg.activation_checkpointing,
        micro_batches=cfg.micro_batches, partition=cfg.partition, stage_layers=tuple(cfg.stage_layers),
        vocab_size=shape.vocab_size, padded_vocab_size=padded, shape=shape)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0)

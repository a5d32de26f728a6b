"""`ofa-train --config FILE --check`: what a job would hold per rank, without starting a process group.

It validates the config for the launcher's world size (the same checks as a real start), builds this layout's
model on the meta device with a shape-only tensor-parallel factory (layers of the sizes one TP rank holds; no
megatron-core process groups are needed for shapes), counts the parameters of each pipeline stage's blocks, and
prints them beside the planner's memory estimate (parallel/planner.py) for the configured ZeRO stage, precision,
micro-batch and activation checkpointing.
"""

from __future__ import annotations

from torch import nn

from ofa_scale.model.kernels import make_layer_norm
from ofa_scale.model.layers import LayerFactory


class ShapeOnlyTPFactory(LayerFactory):
    """The layer shapes one tensor-parallel rank holds (no communication; for counting on the meta device)."""

    def __init__(self, tp_size: int, padded_vocab_size: int):
        self.tp_size = tp_size
        self.tp_rank = 0
        self.padded_vocab_size = padded_vocab_size

    def column_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features // self.tp_size, bias=bias)

    def row_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        # megatron's RowParallelLinear keeps the whole bias on every rank
        return nn.Linear(in_features // self.tp_size, out_features, bias=bias)

    def vocab_embedding(self, num_embeddings: int, dim: int, padding_idx: int | None) -> nn.Module:
        return nn.Embedding(self.padded_vocab_size // self.tp_size, dim)

    def ffn_layernorm(self, dim: int, eps: float = 1e-5) -> nn.Module:
        return make_layer_norm(dim // self.tp_size, eps)


def block_of(name: str, encoder_layers: int) -> int:
    """Pipeline block (parallel/pipeline_layers.py) of an OFA parameter name: 0 embedding + stem, 1..E encoder
    layers, E+1 decoder embedding (with the encoder's final norm), E+2.. decoder layers, last the head."""
    parts = name.split(".")
    side = parts[0]
    if parts[1] in ("layers", "token_rel_pos_table_list", "image_rel_pos_table_list"):
        i = int(parts[2])
        return 1 + i if side == "encoder" else encoder_layers + 2 + i
    if side == "encoder":
        return encoder_layers + 1 if parts[1] == "layer_norm" else 0
    if parts[1] == "layer_norm":
        return -1
    return encoder_layers + 1


def stage_parameters(model: nn.Module, cfg, stage_blocks: list[int]) -> list[int]:
    """Parameters per pipeline stage (the tied embedding counts on the first and on the last stage)."""
    n_blocks = cfg.encoder_layers + cfg.decoder_layers + 3
    per_block = [0] * n_blocks
    for name, p in model.named_parameters():
        per_block[block_of(name, cfg.encoder_layers)] += p.numel()
    embedding = model.encoder.embed_tokens.weight.numel()
    if len(stage_blocks) > 1:
        per_block[-1] += embedding
    out, start = [], 0
    for n in stage_blocks:
        out.append(sum(per_block[start:start + n]))
        start += n
    return out


def check_config(cfg, world_size: int) -> str:
    """The report `ofa-train --check` prints (raises ConfigError/UserError on an invalid config)."""
    import torch

    from ofa_scale.model import OFAModel
    from ofa_scale.parallel import planner
    from ofa_scale.parallel.stage_balance import block_costs, balanced_split
    from ofa_scale.training.trainer import plan

    workload, layout, grad_accum = plan(cfg, world_size)
    model_cfg = workload.model_config
    with torch.device("meta"):
        model = OFAModel(model_cfg, layers=ShapeOnlyTPFactory(layout.tp, layout.padded_vocab_size))
    vl = workload.objectives.vl  # a finetuning workload has its task's shapes
    if layout.pp > 1:
        blocks = list(layout.stage_layers) if layout.partition == "explicit" else balanced_split(
            block_costs(model_cfg, layout.partition, vl.image_size, vl.source_length, vl.target_length, layout.tp),
            layout.pp)
    else:
        blocks = [model_cfg.encoder_layers + model_cfg.decoder_layers + 3]
    per_stage = stage_parameters(model, model_cfg, blocks)
    zero = layout.zero_stage
    precision = "bf16" if cfg.precision in ("bf16", "fp16") else "fp32"
    mems = planner.rank_memory(model_cfg, layout.tp, layout.dp, zero, precision, blocks)
    work = planner.Workload(global_batch=cfg.train.global_batch_size, image_size=vl.image_size,
                            src_len=vl.source_length, tgt_len=vl.target_length, precision=precision)
    hw = planner.Hardware(gpus=world_size)
    est = planner.plan_layout(model_cfg, work, hw, layout.tp, layout.pp, zero, layout.activation_checkpointing,
                              cfg.train.micro_batch_size)
    total = planner.total_params(model_cfg)
    lines = [f"ofa-train --check: config is valid for {world_size} process(es)",
             f"layout: {layout.describe()}, gradient accumulation {grad_accum}, {cfg.precision}, "
             f"activation checkpointing {'on' if layout.activation_checkpointing else 'off'}",
             f"model: {model_cfg.arch} ({total:,} parameters; vocabulary {model_cfg.vocab_size}, padded to "
             f"{layout.padded_vocab_size})",
             "parameters per rank (one tensor-parallel rank of each pipeline stage, before ZeRO partitioning):"]
    gib = float(1 << 30)
    for stage, (n, mem) in enumerate(zip(per_stage, mems)):
        lines.append(f"  stage {stage}: {n:,} parameters (blocks {blocks[stage]}); model states per rank "
                     f"{mem.params / gib:.2f} params + {mem.grads / gib:.2f} grads + {mem.optimizer / gib:.2f} "
                     f"optimizer GiB (planner)")
    lines.append(f"planner estimate for the busiest rank at micro-batch {cfg.train.micro_batch_size}: "
                 f"{est.mem_total_gb:.2f} GB in all ({est.mem_activations_gb:.2f} GB activations, "
                 f"{est.mem_buffers_gb:.2f} GB buffers)")
    return "\n".join(lines)

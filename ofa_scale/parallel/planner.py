"""Layout planner: which tp × pp × dp × ZeRO layouts fit, and how fast each should be.

The model (documented here because `ofa-plan` prints its numbers without showing its working):

Parameters: counted exactly from the model's OFAConfig (model/config.py) by parallel/stage_balance.py
`param_groups`; the presets' counts match the spec (§4, §5.2). Under TP a parameter is split when its rows/columns
are per-head or per-FFN-unit (q/k/v/out and fc1/fc2 weights, column biases, relative-position tables, c_attn,
ffn_layernorm, pos_q/pos_k linears, the vocabulary); everything else (ResNet, LayerNorms, row-parallel biases,
position tables, image_proj) is replicated. Under PP each stage holds the parameters of its layers, the first and
last stage both hold the tied embedding.

Memory per GPU (bytes):
  parameters  = P_local × b_p / (dp if ZeRO-3)            b_p = 2 (bf16) or 4 (fp32)
  gradients   = P_local × b_g / (dp if ZeRO ≥ 2)          b_g = b_p
  optimizer   = P_local × b_o / (dp if ZeRO ≥ 1)          b_o = 12 (fp32 master + Adam m, v) or 8 (fp32: m, v)
  activations = per in-flight micro-batch: Korthikanti et al.'s per-layer count  s·b·d·(10 + 24/tp + 5·a·s/(d·tp))
                bytes (bf16, no sequence parallel; cross-attention adds its key/value tensors), plus the ResNet's
                conv/BN/ReLU outputs; with activation checkpointing only each layer's input (2·s·b·d bytes) plus
                one layer's working set. The first pipeline stage keeps `pp` micro-batches in flight (1F1B).
  buffers     = DeepSpeed's reduce/all-gather buckets (2 × bucket elements × b_p) + the PP send/recv buffers.

FLOPs: those of ofa_scale/model/flops.py, split per pipeline block by parallel/stage_balance.py, which also
balances the pipeline stages exactly as the pipeline module does at run time.

Step time (seconds), no overlap of communication with compute (pessimistic, so rankings favour less traffic):
  compute  = FLOPs / (tflops × 1e12); training FLOPs = 3 × forward (4 × with activation checkpointing). Transformer
             FLOPs divide by tp; the ResNet stem is replicated under TP so its FLOPs do not.
  pipeline = (m + pp − 1) × slowest-stage time per micro-batch (1F1B bubble), m = micro-batches per step.
  TP       = 2 all-reduces per encoder layer, 3 per decoder layer, forward and backward (and the recomputed
             forward), of s·b·d·b_p bytes each.
  Every all-reduce costs 2·(n−1)/n × bytes / bandwidth + 2·log2(n) × per-hop latency.
  PP       = per micro-batch and stage boundary, forward and back, the tensors that cross it: on the encoder side
             states, position embeddings, the shared absolute bias (L²·H/tp) and the decoder's token embeddings;
             on the decoder side states, encoder states and the self/cross biases.
  DP       = reduce-scatter + all-gather of the local gradients/parameters (2·(dp−1)/dp × P_local × b_p), plus
             ZeRO-3's extra parameter all-gather in forward and backward (2 × (dp−1)/dp × P_local × b_p).
  A group uses the intra-node bandwidth when it fits in one node (ranks are ordered tp, dp, pp), else inter-node.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from ofa_scale.errors import ConfigError
from ofa_scale.model.config import PRESETS, OFAConfig
from ofa_scale.model.flops import resnet_forward_flops, step_flops
from ofa_scale.parallel.stage_balance import balanced_split, param_groups, pipeline_block_flops

GiB = 1024**3

# The presets of spec §4.1 (model/config.py), plus a 10B-class OFA for planning (same 2:1 encoder:decoder depth
# ratio as ofa_huge).
ARCHS: dict[str, OFAConfig] = {
    **{name: OFAConfig.preset(name) for name in PRESETS},
    "ofa_10b": OFAConfig(arch="ofa_10b", d_model=4096, ffn_dim=16384, heads=32, encoder_layers=32, decoder_layers=16,
                         resnet="resnet152"),
}


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_mem_gb: float = 80.0
    tflops: float = 400.0  # achievable dense bf16 TFLOP/s per GPU
    gpus_per_node: int = 8
    intra_node_gbs: float = 300.0  # per-GPU bus bandwidth inside a node (NVLink), GB/s
    inter_node_gbs: float = 50.0  # per-GPU bandwidth across nodes (400 Gb/s InfiniBand), GB/s
    intra_node_latency_us: float = 10.0  # per hop of a collective
    inter_node_latency_us: float = 30.0


@dataclass(frozen=True)
class Workload:
    global_batch: int
    image_size: int = 480
    src_len: int = 128  # text tokens of the encoder
    tgt_len: int = 64  # decoder tokens
    precision: str = "bf16"  # bf16 (mixed, fp32 master) or fp32
    bucket_elements: int = 50_000_000

    @property
    def image_tokens(self) -> int:
        """Patches of the ResNet's output grid (the stem's strides only, so any config gives the same grid)."""
        _, h, w = resnet_forward_flops(OFAConfig(), self.image_size, self.image_size)
        return h * w


def total_params(cfg: OFAConfig) -> int:
    return param_groups(cfg).total()


# -- one layout ---------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    tp: int
    pp: int
    dp: int
    zero: int
    checkpointing: bool
    micro_batch: int
    micro_batches: int
    params_per_gpu: int  # parameters held (before ZeRO-3 partitioning) on the busiest rank
    mem_params_gb: float
    mem_grads_gb: float
    mem_optimizer_gb: float
    mem_activations_gb: float
    mem_activations_no_ckpt_gb: float
    mem_activations_ckpt_gb: float
    mem_buffers_gb: float
    t_compute: float
    t_bubble: float
    t_tp: float
    t_pp: float
    t_dp: float
    stage_layers: list[int] = field(default_factory=list)

    @property
    def mem_total_gb(self) -> float:
        return (self.mem_params_gb + self.mem_grads_gb + self.mem_optimizer_gb + self.mem_activations_gb
                + self.mem_buffers_gb)

    @property
    def step_time(self) -> float:
        return self.t_compute + self.t_bubble + self.t_tp + self.t_pp + self.t_dp

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mem_total_gb"] = self.mem_total_gb
        d["step_time"] = self.step_time
        return d


def stage_params(cfg: OFAConfig, tp: int, stage_layers: list[int]) -> list[int]:
    """Parameters held by one TP rank of each pipeline stage."""
    g = param_groups(cfg)
    per_layer = ([g.stem_replicated + (g.stem_split + g.embedding) / tp]
                 + [g.encoder_layer_replicated + g.encoder_layer_split / tp] * cfg.encoder_layers
                 + [g.decoder_embed_replicated + g.decoder_embed_split / tp]
                 + [g.decoder_layer_replicated + g.decoder_layer_split / tp] * cfg.decoder_layers
                 + [g.head_replicated + (g.embedding / tp if len(stage_layers) > 1 else 0)])
    out, start = [], 0
    for n in stage_layers:
        out.append(int(sum(per_layer[start:start + n])))
        start += n
    return out


@dataclass
class RankMemory:
    """Model-state bytes on one rank of one pipeline stage."""

    params: float
    grads: float
    optimizer: float
    params_held: int  # parameters of the stage on this TP rank, before ZeRO-3 partitioning


def rank_memory(cfg: OFAConfig, tp: int, dp: int, zero: int, precision: str, stage_layers: list[int]
                ) -> list[RankMemory]:
    """Parameter, gradient and optimizer-state bytes per rank for each pipeline stage (see module docstring)."""
    bp = 2 if precision == "bf16" else 4
    bo = 12 if precision == "bf16" else 8
    out = []
    for p_local in stage_params(cfg, tp, stage_layers):
        out.append(RankMemory(params=p_local * bp / (dp if zero >= 3 else 1),
                              grads=p_local * bp / (dp if zero >= 2 else 1),
                              optimizer=p_local * bo / (dp if zero >= 1 else 1), params_held=p_local))
    return out


def _group_bw(hw: Hardware, stride: int, size: int) -> float:
    return (hw.intra_node_gbs if stride * size <= hw.gpus_per_node else hw.inter_node_gbs) * 1e9


def layer_activation_bytes(s: int, b: int, d: int, heads: int, tp: int) -> float:
    return s * b * d * (10 + 24 / tp + 5 * heads * s / (d * tp))


def plan_layout(cfg: OFAConfig, w: Workload, hw: Hardware, tp: int, pp: int, zero: int, checkpointing: bool,
                micro_batch: int) -> Plan:
    dp = hw.gpus // (tp * pp)
    per_replica = w.global_batch // dp
    m = per_replica // micro_batch
    bp = 2 if w.precision == "bf16" else 4
    L, T, d = w.image_tokens + w.src_len, w.tgt_len, cfg.d_model
    costs = pipeline_block_flops(cfg, w.image_size, w.src_len, w.tgt_len, tp)
    stage_layers = balanced_split(costs, pp) if pp > 1 else [len(costs)]
    mems = rank_memory(cfg, tp, dp, zero, w.precision, stage_layers)
    busiest = max(mems, key=lambda m: m.params_held)
    p_local = busiest.params_held
    mem_p, mem_g, mem_o = busiest.params, busiest.grads, busiest.optimizer

    # activations on the first stage (the ResNet lives there and it keeps pp micro-batches in flight)
    in_flight = min(pp, m)
    first_enc = max(0, min(stage_layers[0] - 1, cfg.encoder_layers))
    act_bytes_scale = bp / 2  # the Korthikanti count assumes 2-byte activations
    enc_full = layer_activation_bytes(L, micro_batch, d, cfg.heads, tp) * act_bytes_scale
    enc_ckpt = 2 * L * micro_batch * d * act_bytes_scale
    resnet_act = _resnet_activation_elements(cfg, w.image_size) * micro_batch * bp * 3
    dec_full = (layer_activation_bytes(T, micro_batch, d, cfg.heads, tp)
                + 4 * L * micro_batch * d / tp) * act_bytes_scale  # cross-attention keys/values
    # worst stage: take the max of the stage holding the stem and a pure-decoder stage
    layers_full = first_enc * enc_full if pp > 1 else cfg.encoder_layers * enc_full + cfg.decoder_layers * dec_full
    layers_ckpt = (first_enc * enc_ckpt if pp > 1 else cfg.encoder_layers * enc_ckpt
                   + cfg.decoder_layers * 2 * T * micro_batch * d * act_bytes_scale) + enc_full
    act_no_ckpt = in_flight * (resnet_act + layers_full)
    act_ckpt = in_flight * (resnet_act + layers_ckpt)
    # logits (vocab-split) are materialised in fp32 for the loss on the last stage
    logits = micro_batch * T * cfg.vocab_size / tp * 4 * 2
    act_no_ckpt, act_ckpt = act_no_ckpt + logits, act_ckpt + logits
    buffers = 2 * min(w.bucket_elements, p_local) * bp + (2 * (L + T) * micro_batch * d * bp if pp > 1 else 0)

    # time
    fwd_factor = 4.0 if checkpointing else 3.0
    flops_per_s = hw.tflops * 1e12
    stage_cost = [sum(costs[s:s + n]) for s, n in zip(_starts(stage_layers), stage_layers)]
    t_micro = max(stage_cost) * micro_batch * fwd_factor / flops_per_s
    t_compute = m * t_micro
    t_bubble = (pp - 1) * t_micro
    bw_tp = _group_bw(hw, 1, tp)

    def ar(nbytes, n, bw):  # ring all-reduce bandwidth term + tree-style latency of 2·log2(n) hops
        if n <= 1:
            return 0.0
        hop = (hw.intra_node_latency_us if bw == hw.intra_node_gbs * 1e9 else hw.inter_node_latency_us) * 1e-6
        return 2 * (n - 1) / n * nbytes / bw + 2 * math.log2(n) * hop

    # per micro-batch: one all-reduce per attention/FFN block, forward and backward (+ the recomputed forward)
    n_collectives = 2 * cfg.encoder_layers + 3 * cfg.decoder_layers
    per_call = (2 * cfg.encoder_layers * L + 3 * cfg.decoder_layers * T) * micro_batch * d * bp / n_collectives
    t_tp = (n_collectives * ar(per_call, tp, bw_tp) * (3 if checkpointing else 2) * m / pp) if tp > 1 else 0.0
    bw_pp = _group_bw(hw, tp * dp, pp)
    t_pp = 0.0
    for boundary in _starts(stage_layers)[1:]:  # first block index of each later stage
        if boundary <= cfg.encoder_layers:  # encoder side: states, position embeddings, shared bias, decoder tokens
            elements = 2 * L * d + L * L * cfg.heads / tp + T * d
        else:  # decoder side: states, encoder states, self and cross biases
            elements = T * d + L * d + (T * T + T * L) * cfg.heads / tp
        t_pp += 2 * elements * micro_batch * bp / bw_pp  # forward activations and backward gradients
    t_pp *= (m + pp - 1) / pp
    bw_dp = _group_bw(hw, tp, dp)
    # ZeRO-1 reduces once per step; ZeRO-2 reduce-scatters every micro-batch; ZeRO-3 also gathers parameters
    # for every micro-batch's forward and backward
    t_dp = ar(p_local * bp, dp, bw_dp) * {0: 1.0, 1: 1.0, 2: m, 3: 2.0 * m}[zero]
    return Plan(tp=tp, pp=pp, dp=dp, zero=zero, checkpointing=checkpointing, micro_batch=micro_batch,
                micro_batches=m, params_per_gpu=p_local, mem_params_gb=mem_p / GiB, mem_grads_gb=mem_g / GiB,
                mem_optimizer_gb=mem_o / GiB,
                mem_activations_gb=(act_ckpt if checkpointing else act_no_ckpt) / GiB,
                mem_activations_no_ckpt_gb=act_no_ckpt / GiB, mem_activations_ckpt_gb=act_ckpt / GiB,
                mem_buffers_gb=buffers / GiB, t_compute=t_compute, t_bubble=t_bubble, t_tp=t_tp, t_pp=t_pp,
                t_dp=t_dp, stage_layers=stage_layers)


def _starts(runs):
    out, s = [], 0
    for n in runs:
        out.append(s)
        s += n
    return out


def _resnet_activation_elements(cfg: OFAConfig, image_size: int) -> float:
    """Elements of every conv output of the stem for one image (each is kept for BN and ReLU backward)."""
    s = image_size // 2
    n = 64 * s * s
    s //= 2
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256), cfg.resnet_blocks)):
        for j in range(blocks):
            s_in = s
            if j == 0 and stage > 0:
                s //= 2
            n += planes * s_in * s_in + planes * s * s + 4 * planes * s * s
    return float(n)


def enumerate_plans(cfg: OFAConfig, w: Workload, hw: Hardware, include_infeasible: bool = False) -> list[Plan]:
    """Every layout of the GPUs, each with the largest micro-batch that fits; ranked by predicted step time."""
    if hw.gpus < 1 or w.global_batch < 1:
        raise ConfigError("--gpus and --global-batch must be positive")
    plans: list[Plan] = []
    layers = cfg.encoder_layers + cfg.decoder_layers
    tps = [t for t in _pow2_upto(min(hw.gpus_per_node, hw.gpus)) if cfg.heads % t == 0 and cfg.ffn_dim % t == 0]
    for tp, pp in itertools.product(tps, range(1, layers + 1)):
        if hw.gpus % (tp * pp):
            continue
        dp = hw.gpus // (tp * pp)
        if w.global_batch % dp:
            continue
        per_replica = w.global_batch // dp
        zeros = (1,) if pp > 1 else (1, 2, 3)
        for zero, ckpt in itertools.product(zeros, (False, True)):
            best = None
            for mb in sorted(_divisors(per_replica), reverse=True):
                if pp > 1 and per_replica // mb < pp:
                    continue  # fewer micro-batches than stages leaves stages idle
                p = plan_layout(cfg, w, hw, tp, pp, zero, ckpt, mb)
                if p.mem_total_gb <= hw.gpu_mem_gb:
                    best = p
                    break
                best = best or (p if include_infeasible else None)
            if best is not None:
                plans.append(best)
    plans.sort(key=lambda p: (p.mem_total_gb > hw.gpu_mem_gb, round(p.step_time, 9), p.mem_total_gb))
    return plans


def _pow2_upto(n: int) -> list[int]:
    return [1 << k for k in range(int(math.log2(n)) + 1)] if n >= 1 else []


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def mfu(plan: Plan, cfg: OFAConfig, w: Workload, hw: Hardware) -> float:
    """Model FLOPs (3 × forward, no recomputation) per second over the cluster's peak."""
    useful = step_flops(cfg, w.global_batch, w.src_len, w.tgt_len, w.image_size).train_step
    return useful / plan.step_time / (hw.gpus * hw.tflops * 1e12)

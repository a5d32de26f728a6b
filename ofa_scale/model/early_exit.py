"""MuE early exit at inference (spec ext §10.7, arXiv 2211.11152): stop a layer stack once a layer barely changes
the hidden states.

Rule (MuE `feature/MuE`: unify_transformer.py, sequence_generator.py). After layer l computes h_l from h_{l-1}
(h_0 = the stack's input embedding), cos = cosine(flatten(h_l), flatten(h_{l-1})) over the *whole* tensor of one
decision group; if cos > τ the group stops and keeps h_l (the final LayerNorm and projection follow as usual).
MuE evaluates with batch size 1, so a group is one sample — in beam search its beams jointly. Batched here, every
sample decides on its own rows only (pad positions left out, as a batch-1 run has none), so a batch gives the
results of running its samples one at a time. Rows still running go through the next layer as a sub-batch.

Thresholds (MuE's evaluate.py flags): `image` (--img_thres) and `text` (--txt_thres) for the two streams of
MuE's modality-decomposed encoder (model/mue_encoder.py, on with `model.mue`), each stream exiting on its own
tensor; a joint (ordinary OFA) encoder has one stream and takes the one threshold `encoder=` sets for both.
`decoder` (--decoder_thres): in incremental decoding MuE
schedules the decoder threshold per step t with max_len the generation limit: no exit while t < (max_len+1)/3,
then τ_t = 0.9·decoder + 0.1·exp(−(t+1)/(max_len+1)) (`schedule=False` turns it off). A full teacher-forced
decoder pass (no KV cache) uses the fixed threshold, as MuE's all-candidate scoring does, each row deciding alone.
A threshold ≥ 1 never exits — deliberately also under the schedule (MuE's would lower a 1.0 to about 0.97), so
that 1.0 is the full model.

KV cache after an exit. Later steps attend to every layer's keys/values of every earlier position, so each layer's
self-attention cache must grow by one entry per step for every row, skipped or not. MuE's code means to copy the
exit layer's attention state into the skipped layers, but its decoder layer returns None for that state outside
ONNX tracing, so skipped layers simply miss the step (spec §10.7.2) — impossible with one cache tensor per layer
shared by a batch of beams. Two fills, `kv_fill`:
* "copy" (default, MuE's stated intent): a skipped layer gets the exit layer's keys/values of this step;
* "hidden" (CALM-style state propagation): a skipped layer computes its own keys/values from the exit hidden state
  h_l, as if h_l had been its input.
Cross-attention keys/values depend only on the encoder output: a layer that first runs late computes its own.

The fast all-candidate scorer (model/candidates.py) runs its own decoder layer loop without exits; with a
decoder threshold below 1 `score_candidates` takes OFA's naive path instead (the decoder's forward, rows deciding
alone), so SNLI-VE's all-candidate evaluation exits as MuE's does.

Inference only, with every rank holding the whole model (`ofa-eval run`, `ofa-predict`): samples run different
numbers of layers, so under ZeRO-3, tensor parallelism across different data or a pipeline (where every forward is
a collective) ranks would stop matching; training and the trainer's validation never enable it (MuE validates with
`is_train=True`, i.e. no exits), and `enable` refuses ZeRO-3-partitioned weights and anything that is not a whole
OFAModel (a pipeline stage).

Usage: `enable(model, EarlyExitConfig.parse("0.95"))` (or "img=0.99,txt=0.7,decoder=0.9" on a decomposed encoder,
"encoder=0.99,decoder=0.9"); `model/generate.generate` and the tasks' `predict` then exit, and
`cfg.stats.summary()` says how many layers ran. `enable(model, None)` restores the
full model (the hooks in encoder.py / decoder.py then run their original loops).
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Callable, Optional

import torch

from ofa_scale.errors import ConfigError, UserError

GROUPS_KEY = "early_exit.groups"  # (N,) decision group (sample) of each decoder row; reordered with the cache
MAX_LEN_KEY = "early_exit.max_len"  # generation limit, for the decoder schedule
KV_FILLS = ("copy", "hidden")


# what the stats count: the joint encoder per sample, the decomposed encoder's image / text stream per sample, the
# decoder per row-step (a beam row at one step)
PARTS = ("encoder", "image", "text", "decoder")


@dataclass
class ExitStats:
    """Layers run per part (PARTS), summed over its units (samples; decoder: row-steps), and the stack depth."""

    layers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    units: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    depth: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))

    def add(self, part: str, layers_run: torch.Tensor, depth: int) -> None:
        self.layers[part] += int(layers_run.sum())
        self.units[part] += layers_run.numel()
        self.depth[part] = depth

    def summary(self) -> dict[str, float]:
        """Mean layers run per unit of each part that ran, and as a fraction of the stack."""
        out: dict[str, float] = {}
        for part in PARTS:
            if self.units[part]:
                mean = self.layers[part] / self.units[part]
                out[f"{part}_layers_mean"] = round(mean, 4)
                out[f"{part}_layers_fraction"] = round(mean / self.depth[part], 4)
        return out

    def summed_over_ranks(self) -> "ExitStats":
        """These counts summed over the data-parallel ranks (one all-reduce; every rank must call it)."""
        from ofa_scale.parallel import collectives

        totals = collectives.reduce_sum_list([self.layers[p] for p in PARTS] + [self.units[p] for p in PARTS])
        k = len(PARTS)
        return ExitStats(layers={p: int(v) for p, v in zip(PARTS, totals[:k])},
                         units={p: int(v) for p, v in zip(PARTS, totals[k:])}, depth=dict(self.depth))


THRESHOLDS = ("image", "text", "decoder")
_KEYS = {"img": ("image",), "txt": ("text",), "encoder": ("image", "text"), "decoder": ("decoder",)}


@dataclass
class EarlyExitConfig:
    """`image` / `text`: the decomposed encoder's streams (MuE img_thres / txt_thres); `encoder=` at construction
    sets both (the joint encoder's one threshold); `decoder`: decoder_thres. 1.0 = never exit."""

    image: float = 1.0
    text: float = 1.0
    decoder: float = 1.0
    schedule: bool = True
    kv_fill: str = "copy"
    stats: ExitStats = field(default_factory=ExitStats)
    encoder: InitVar[Optional[float]] = None

    def __post_init__(self, encoder: Optional[float]) -> None:
        if encoder is not None:
            self.image = self.text = encoder

    def validate(self) -> None:
        for name in THRESHOLDS:
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0 or math.isnan(value):
                raise ConfigError(f"early-exit {name} threshold {value} must be a cosine in [-1, 1] "
                                  f"(1 = never exit)")
        if self.kv_fill not in KV_FILLS:
            raise ConfigError(f"early-exit kv_fill={self.kv_fill!r} must be one of {', '.join(KV_FILLS)}")

    @classmethod
    def parse(cls, text: str) -> "EarlyExitConfig":
        """"0.95" (every threshold) or comma-separated keys: img=, txt=, encoder= (img and txt), decoder=,
        schedule=on|off, kv_fill=copy|hidden."""
        fields: dict[str, object] = {}
        try:
            if "=" not in text:
                fields.update(dict.fromkeys(THRESHOLDS, float(text)))
            else:
                for part in text.split(","):
                    key, _, value = part.partition("=")
                    key, value = key.strip(), value.strip()
                    if key in _KEYS:
                        fields.update(dict.fromkeys(_KEYS[key], float(value)))
                    elif key == "schedule" and value in ("on", "off"):
                        fields[key] = value == "on"
                    elif key == "kv_fill":
                        fields[key] = value
                    else:
                        raise ValueError(part)
        except ValueError:
            raise ConfigError(f"--early-exit {text!r}: give a threshold (e.g. 0.95) or keys like "
                              "img=0.99,txt=0.7,decoder=0.9 (encoder= sets img and txt),schedule=on|off,"
                              "kv_fill=copy|hidden") from None
        cfg = cls(**fields)
        cfg.validate()
        return cfg

    def describe(self) -> dict[str, object]:
        return {"image": self.image, "text": self.text, "decoder": self.decoder, "schedule": self.schedule,
                "kv_fill": self.kv_fill}


def resolve(flag: str | None, recipe: str | None) -> EarlyExitConfig | None:
    """The exits `ofa-eval run` / `ofa-predict` run: the --early-exit flag's, else the recipe's task.early_exit;
    "off" (either place) or neither is the full model (None)."""
    spec = flag if flag is not None else recipe
    return None if spec in (None, "off") else EarlyExitConfig.parse(spec)


def use_recipe_encoder(model, model_overrides: dict) -> None:
    """A recipe's `model.overrides.mue` switches the model to (or from) MuE's decomposed encoder: it adds no
    parameters, so any checkpoint runs a MuE recipe's per-stream exits."""
    if "mue" in model_overrides:
        model.config.mue = bool(model_overrides["mue"])


def enable(model, cfg: EarlyExitConfig | None) -> None:
    """Switch early exit on (cfg) or off (None) for `model`'s encoder and decoder. Refused where ranks could run
    different layers inside collectives (ZeRO-3 partitioned weights, a pipeline stage) and for separate image /
    text thresholds on a joint encoder."""
    if cfg is not None:
        cfg.validate()
        if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
            raise UserError("MuE early exit needs the whole OFAModel on every rank (not a pipeline stage); "
                            "evaluate with ofa-eval run or ofa-predict")
        if any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 marks its partitioned params
            raise UserError("MuE early exit cannot run on ZeRO-3 partitioned weights: samples that exit at "
                            "different layers would desynchronise the ranks' parameter gathers; evaluate the "
                            "checkpoint with ofa-eval run, which holds the whole model per rank")
        if cfg.image != cfg.text and not getattr(model.encoder.cfg, "mue", False):
            raise ConfigError(f"separate image/text exit thresholds (img={cfg.image}, txt={cfg.text}) need MuE's "
                              f"modality-decomposed encoder (model.overrides.mue: true); this model's encoder is "
                              f"joint, so give one threshold with encoder=")
    model.encoder.early_exit = cfg
    model.decoder.early_exit = cfg


def config_of(model) -> EarlyExitConfig | None:
    return getattr(getattr(model, "decoder", None), "early_exit", None)


def start_decoding(model, incremental_state: dict | None, groups: torch.Tensor, max_len: int) -> None:
    """Give incremental decoding what the decoder's exits need: each row's sample (beams decide jointly) and the
    generation limit (the schedule). A no-op when exits are off or there is no cache."""
    if incremental_state is None or config_of(model) is None:
        return
    incremental_state[GROUPS_KEY] = groups
    incremental_state[MAX_LEN_KEY] = int(max_len)


def decoder_threshold(cfg: EarlyExitConfig, step: int, max_len: int | None) -> float:
    """τ for decoding position `step` (MuE's schedule when max_len is known and cfg.schedule), else cfg.decoder;
    +inf means no exit."""
    if cfg.decoder >= 1.0:
        return math.inf
    if not cfg.schedule or max_len is None:
        return cfg.decoder
    if step < (max_len + 1) / 3:
        return math.inf
    return 0.9 * cfg.decoder + 0.1 * math.exp(-(step + 1) / (max_len + 1))


def group_cosine(new: torch.Tensor, old: torch.Tensor, groups: torch.Tensor, keep: torch.Tensor | None
                 ) -> torch.Tensor:
    """(N,) cosine of each row's group between `new` and `old` (N, T, D), each flattened over its rows' kept
    tokens (`keep` (N, T) bool, None = all), in float32."""
    new, old = new.float(), old.float()
    if keep is not None:
        k = keep[:, :, None].to(new.dtype)
        new, old = new * k, old * k
    per_row = torch.stack([(new * old).sum((1, 2)), (new * new).sum((1, 2)), (old * old).sum((1, 2))], dim=1)
    size = int(groups.max()) + 1
    sums = per_row.new_zeros(size, 3).index_add_(0, groups, per_row)[groups]
    return sums[:, 0] / (sums[:, 1].sqrt() * sums[:, 2].sqrt()).clamp_min(1e-12)


def _pick(t: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or idx is None else t.index_select(0, idx)


# ------------------------------------------------------------------------------------------- encoder
def run_stack(layers, x: torch.Tensor, keep: torch.Tensor, layer_mask: torch.Tensor | None,
              bias_of: Callable[[int], torch.Tensor], threshold: float, stats: ExitStats | None, part: str
              ) -> torch.Tensor:
    """An encoder layer stack (or one stream of it) with per-sample exits at `threshold` -> each sample's last
    layer output (B, L, D). `keep` (B, L) bool: the tokens the cosine sees (not padding); `bias_of(i)`: layer
    i's attention bias (B, H, L, L). A threshold >= 1 is the plain loop (no host sync per layer)."""
    n = x.shape[0]
    if threshold >= 1.0:
        for i, layer in enumerate(layers):
            x = layer(x, layer_mask, bias_of(i))
        if stats is not None:
            stats.add(part, torch.full((n,), len(layers)), len(layers))
        return x
    groups = torch.arange(n, device=x.device)
    # a sample with nothing in this stream (no image: the image stream is all padding) has nothing to compute
    has_tokens = keep.any(1)
    active = has_tokens.clone()
    layers_run = torch.zeros(n, dtype=torch.long, device=x.device)
    for i, layer in enumerate(layers):
        if not bool(active.any()):
            break
        idx = None if bool(active.all()) else active.nonzero().flatten()
        old = _pick(x, idx)
        new = layer(old, _pick(layer_mask, idx), _pick(bias_of(i), idx))
        x = new if idx is None else x.index_copy(0, idx, new)
        layers_run += active.long()
        if i + 1 < len(layers):  # after the last layer there is nothing to skip
            exited = group_cosine(new, old, groups[:new.shape[0]], _pick(keep, idx)) > threshold
            if idx is None:
                active &= ~exited
            else:
                active[idx] = ~exited
    if stats is not None:
        stats.add(part, layers_run[has_tokens], len(layers))
    return x


def run_encoder_layers(encoder, x: torch.Tensor, padding_mask: torch.Tensor, layer_mask: torch.Tensor | None,
                       pos, cfg: EarlyExitConfig) -> torch.Tensor:
    """The joint encoder's layer loop with per-sample exits (one threshold: `enable` checked image == text)."""
    return run_stack(encoder.layers, x, ~padding_mask, layer_mask, lambda i: encoder.layer_bias(i, pos), cfg.text,
                     cfg.stats, "encoder")


# ------------------------------------------------------------------------------------------- decoder
def _sub_cache(cache: dict, idx: torch.Tensor) -> dict:
    return {part: {k: v.index_select(0, idx) for k, v in cache.get(part, {}).items()}
            for part in ("self_attn", "encoder_attn")}


def _ensure_cross_cache(layer, cache: dict, encoder_out) -> None:
    """Fill the layer's cross-attention keys/values for every row (its forward on a dummy query does it), so a
    sub-batch can take its rows from them."""
    cross = cache.setdefault("encoder_attn", {})
    if "k" not in cross:
        states = encoder_out.states
        layer.encoder_attn(states[:, :1], states, key_padding_mask=encoder_out.padding_mask, cache=cross,
                           static_kv=True)


def _hidden_kv(layer, h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's keys/values the layer's self-attention makes from `h` (the rows' exit hidden state): its
    forward on an empty scratch cache stores them (the attention output, over this step's keys only, is dropped)."""
    scratch: dict = {}
    tq = h.shape[1]
    layer.self_attn(layer.self_attn_layer_norm(h), bias=bias[..., -tq:], causal_offset=0, cache=scratch)
    return scratch["k"], scratch["v"]


def _merge(n: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(n, …) tensor whose rows `idx` come from `part` for each (idx, part)."""
    first = parts[0][1]
    out = first.new_empty((n, *first.shape[1:]))
    for idx, part in parts:
        out.index_copy_(0, idx, part)
    return out


def run_decoder_layers(decoder, x: torch.Tensor, self_pad: torch.Tensor | None, pos, encoder_out,
                       cross: torch.Tensor, causal_offset: int | None, incremental_state: dict | None,
                       cfg: EarlyExitConfig) -> torch.Tensor:
    """The decoder's layer loop with per-group exits -> the last layer output of each row (B, Tq, D). With a
    cache, every layer's self-attention cache still grows by this call's Tq entries for every row (module
    docstring: kv_fill), so later steps and beam reorders see one consistent tensor per layer."""
    n, tq = x.shape[0], x.shape[1]
    state = incremental_state
    groups = None if state is None else state.get(GROUPS_KEY)
    if groups is None or groups.shape[0] != n:
        groups = torch.arange(n, device=x.device)
    if state is not None:
        threshold = decoder_threshold(cfg, pos.start, state.get(MAX_LEN_KEY))
    else:
        threshold = math.inf if cfg.decoder >= 1.0 else cfg.decoder
    keep = None if self_pad is None else ~self_pad[:, pos.start:]
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    layers_run = torch.zeros(n, dtype=torch.long, device=x.device)
    exit_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # "copy": this step's K/V of each row's exit layer
    for i, layer in enumerate(decoder.layers):
        if state is None and not bool(active.any()):
            break
        cache = None if state is None else state.setdefault(f"decoder.layers.{i}", {})
        bias = decoder.self_bias(i, pos)
        if bool(active.all()):  # the plain layer call, as without exits
            idx, old = None, x
            x = new = layer(x, self_pad, bias, encoder_out.states, encoder_out.padding_mask, cross,
                            causal_offset=causal_offset, cache=cache)
        else:
            idx, rest = active.nonzero().flatten(), (~active).nonzero().flatten()
            old = new = x.index_select(0, idx)
            sub = None
            if idx.numel():
                if cache is not None:
                    _ensure_cross_cache(layer, cache, encoder_out)
                    sub = _sub_cache(cache, idx)
                new = layer(old, _pick(self_pad, idx), bias.index_select(0, idx),
                            encoder_out.states.index_select(0, idx), _pick(encoder_out.padding_mask, idx),
                            cross.index_select(0, idx), causal_offset=causal_offset, cache=sub)
                x = x.index_copy(0, idx, new)
            if cache is not None:
                if cfg.kv_fill == "copy":
                    fill_k, fill_v = exit_kv[0].index_select(0, rest), exit_kv[1].index_select(0, rest)
                else:
                    fill_k, fill_v = _hidden_kv(layer, x.index_select(0, rest), bias.index_select(0, rest))
                ks, vs = [(rest, fill_k)], [(rest, fill_v)]
                if sub is not None:
                    ks.append((idx, sub["self_attn"]["k"][:, :, -tq:]))
                    vs.append((idx, sub["self_attn"]["v"][:, :, -tq:]))
                own = cache.setdefault("self_attn", {})
                step_k, step_v = _merge(n, ks), _merge(n, vs)
                own["k"] = step_k if "k" not in own else torch.cat([own["k"], step_k], dim=2)
                own["v"] = step_v if "v" not in own else torch.cat([own["v"], step_v], dim=2)
        if cache is not None and cfg.kv_fill == "copy":
            step_k, step_v = cache["self_attn"]["k"][:, :, -tq:], cache["self_attn"]["v"][:, :, -tq:]
            ran = active[:, None, None, None]
            exit_kv = (step_k, step_v) if exit_kv is None else (torch.where(ran, step_k, exit_kv[0]),
                                                                torch.where(ran, step_v, exit_kv[1]))
        layers_run += active.long()
        if threshold < math.inf and new.shape[0] and i + 1 < len(decoder.layers):
            sub_groups = groups if idx is None else groups.index_select(0, idx)
            exited = group_cosine(new, old, sub_groups, _pick(keep, idx)) > threshold
            if idx is None:
                active &= ~exited
            else:
                active[idx] = ~exited
    cfg.stats.add("decoder", layers_run, len(decoder.layers))
    return x

"""Parameter-efficient tuning of OFA (spec-ext §10.3): prefix tuning, bottleneck adapters, BitFit.

* **Prefix** (`PrefixKeyValues`): every encoder and decoder *self*-attention gets L_p learned key/value pairs that
  are prepended to its projected keys and values (they bypass k_proj/v_proj, get no positional bias, are always
  visible — padding and causal masks see them as real, earlier keys — and never enter the incremental-decoding
  cache; attention.py's marked region does the splice). OFA keeps one `nn.Embedding(L_p, 2·n_layers·d)` per side
  (`encoder.encoder_prompt_encoder.embedding.weight`); here each attention module owns its own slice as two
  tables `…self_attn.prefix.{key,value}.weight` of shape (L_p, heads·head_dim). The values are the same numbers
  (`ofa_prefix_layout` converts), but a module-local table is what lets ZeRO-3 gather it around the attention
  that uses it and tensor parallelism split it by heads exactly like the keys it joins (each TP rank holds its
  heads' columns). OFA's optional reparameterisation MLP (`--*-prompt-projection`, shared by all layers) is off in
  every OFA script and is not built (model.prompt_tuning.projection is refused).
* **Adapter** (`Adapter`): down_proj → ReLU → up_proj, plus its own input, after each layer's fc2 + dropout and
  before the residual add (blocks.py). Replicated under TP: its input and output are the full residual stream.
* **BitFit**: no new parameters; `bitfit_trainable(name)` is OFA's train.py name rule.

Which parameters train is `trainable(name, kind)`; finetune/freeze.py applies it. Parameter initial values follow
OFA (`init_bert_params`: N(0, 0.02) tables and weights, zero biases), through model/init.py's module rules.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

# the name fragment every prefix table carries (…self_attn.prefix.key.weight)
PREFIX_MODULE = "prefix"
ADAPTER_MODULE = "adapter"
KINDS = ("none", "prefix", "adapter", "bitfit")


class PrefixKeyValues(nn.Module):
    """L_p key and value vectors for this rank's heads of one self-attention."""

    def __init__(self, length: int, local_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.length, self.local_heads, self.head_dim, self.dropout = length, local_heads, head_dim, dropout
        self.key = nn.Embedding(length, local_heads * head_dim)
        self.value = nn.Embedding(length, local_heads * head_dim)

    def forward(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> key, value (B, H_local, L_p, head_dim). The tables are looked up (called), never read through
        `.weight`, so ZeRO-3's hooks gather them."""
        rows = torch.arange(self.length, device=self.key.weight.device)
        kv = torch.stack([self.key(rows), self.value(rows)])  # (2, L_p, H·hd)
        kv = kv.view(2, 1, self.length, self.local_heads, self.head_dim).expand(-1, batch, -1, -1, -1)
        # OFA drops out the (B, L_p, …) prompt tensor: an independent mask per batch row
        kv = F.dropout(kv, self.dropout, self.training).transpose(2, 3).to(dtype)
        return kv[0], kv[1]

    def extend(self, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               key_padding_mask: torch.Tensor | None, causal_offset: int | None):
        """Prepend the prefix to k, v (B, H, Tk, hd) and widen what indexes keys to match: the positional bias
        gets zero columns (OFA adds it to the last Tk columns only), the padding mask False columns, and the
        causal offset moves by L_p so every query sees the whole prefix."""
        pk, pv = self(k.shape[0], k.dtype)
        n = self.length
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if bias is not None:
            bias = F.pad(bias, (n, 0))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (n, 0), value=False)
        if causal_offset is not None:
            causal_offset = causal_offset + n
        return k, v, bias, key_padding_mask, causal_offset


class Adapter(nn.Module):
    """OFA's Adapter_Layer: x + up_proj(ReLU(down_proj(x))) (dropout 0, scale 1 as OFA runs it)."""

    def __init__(self, d_model: int, dim: int):
        super().__init__()
        self.down_proj = nn.Linear(d_model, dim)
        self.up_proj = nn.Linear(dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up_proj(F.relu(self.down_proj(x)))


def make_adapter(cfg) -> Adapter | None:
    return Adapter(cfg.d_model, cfg.adapter_dim) if cfg.adapter_dim else None


# ---- which parameters train -------------------------------------------------------------------------------------
def is_prefix(name: str) -> bool:
    return f".{PREFIX_MODULE}." in f".{name}"


def is_adapter(name: str) -> bool:
    return f".{ADAPTER_MODULE}." in f".{name}"


def bitfit_trainable(name: str) -> bool:
    """OFA train.py's --bitfit rule, on OFA state-dict names: LayerNorm biases named `*layer_norm*` and fc1/fc2
    biases (attn_ln, ffn_layernorm, q/k/v/out biases and the embedding LayerNorms stay frozen, as in OFA)."""
    return name.endswith("bias") and ("layer_norm" in name or "fc" in name)


def added_parameter(name: str) -> bool:
    """Parameters prompt tuning adds to the base model (absent from a base checkpoint)."""
    return is_prefix(name) or is_adapter(name)


def trainable(name: str, kind: str) -> bool:
    if kind == "prefix":
        return is_prefix(name)
    if kind == "adapter":
        return is_adapter(name)
    if kind == "bitfit":
        return bitfit_trainable(name)
    raise ValueError(f"prompt tuning kind {kind!r} trains nothing of its own")


# ---- loading a base checkpoint ----------------------------------------------------------------------------------
class WithAddedParameters(Mapping[str, torch.Tensor]):
    """A base model's state dict plus the parameters prompt tuning adds, at their initial values (a base checkpoint
    has none; OFA's upgrade_state_dict_named likewise keeps the freshly built ones)."""

    def __init__(self, base: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]):
        self.base = base
        self.added = [n for n in initial if added_parameter(n) and n not in base]
        self.initial = initial

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.base:
            return self.base[name]
        if name in self.added:
            return self.initial[name]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield from self.added

    def __len__(self) -> int:
        return len(self.base) + len(self.added)

    def __contains__(self, name: object) -> bool:
        return name in self.base or name in self.added


# ---- OFA's parameter layout -------------------------------------------------------------------------------------
def ofa_prefix_layout(state: Mapping[str, torch.Tensor], side: str, layers: int) -> torch.Tensor:
    """OFA's `{side}.{side}_prompt_encoder.embedding.weight` (L_p, 2·layers·d) from our per-layer tables: row block
    2i is layer i's key, 2i+1 its value (OFA views it as (L_p, 2·n_l, H, hd) and gives layer i chunk i of 2)."""
    blocks = []
    for i in range(layers):
        for part in ("key", "value"):
            blocks.append(state[f"{side}.layers.{i}.self_attn.{PREFIX_MODULE}.{part}.weight"])
    return torch.cat(blocks, dim=1)


def from_ofa_prefix_layout(weight: torch.Tensor, side: str, layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `ofa_prefix_layout`: per-layer key/value tables from OFA's prompt embedding."""
    chunks = weight.chunk(2 * layers, dim=1)
    return {f"{side}.layers.{i}.self_attn.{PREFIX_MODULE}.{part}.weight": chunks[2 * i + j].clone()
            for i in range(layers) for j, part in enumerate(("key", "value"))}

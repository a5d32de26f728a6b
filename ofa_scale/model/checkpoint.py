"""Released-checkpoint import and our own pretrained-model directory format (spec §5).

* `import_fairseq_checkpoint(ckpt.pt)` reads a fairseq/OFA checkpoint safely (`safe_load`), infers the
  architecture from `cfg["model"]` or legacy `args` (falling back to the tensor shapes when neither exists), maps
  every key strictly, casts fp16/bf16 to fp32, ties the three shared-embedding keys into one tensor and rebuilds the
  index buffers (`version`, `*_rp_bucket`, `image_position_idx`) instead of loading them (released files carry a
  stale 1025-entry `image_position_idx`, spec §5.1).
* `save_pretrained(model, DIR)` writes `DIR/model.safetensors` (each tensor once, the recomputed buffers left out)
  and `DIR/config.json` (the OFAConfig + format_version), both atomically; `load_pretrained(DIR or ckpt.pt)` reads
  either form and returns the model in eval mode. DIR round-trips bit-exactly.

Row resizing (spec §5.1), decided here:
* `embed_image_positions` with fewer rows than the config needs: the missing rows are appended ~ N(0, d^-0.5)
  (as OFA does). More rows: the extra rows are dropped with a log message - position ids never exceed
  image_bucket_size², so those rows are unreachable and dropping them changes no output.
* Token embedding with fewer rows than the requested vocab_size: rows appended ~ N(0, d^-0.5) (tied, so
  encoder/decoder/output projection all grow). More rows: an error, unless `truncate_vocab=True`, because the
  dropped rows are real tokens of the checkpoint's dictionary.
Appended rows come from a torch.Generator seeded with `seed`, so an import is reproducible.

OFA-CN checkpoints (spec §10.1.3) import the same way (their [30325, d] embedding sets vocab_size); the model
directory records the checkpoint's tokenizer kind ("bert" for `bpe=bert`), and `--tokenizer-path` checks the
rows against the tokenizer the model will run with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.model.config import PRESETS, RESNET_BLOCKS, OFAConfig
from ofa_scale.model.safe_load import safe_torch_load
from ofa_scale.utils.config import apply_overrides, from_dict
from ofa_scale.utils.io import atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# The one shared embedding appears under three names in OFA's state dict; we store it under the first.
TIED_EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                       "decoder.output_projection.weight")
EMBEDDING_KEY = TIED_EMBEDDING_KEYS[0]
IMAGE_POSITION_KEYS = ("encoder.embed_image_positions.weight", "decoder.embed_image_positions.weight")
# Deterministic functions of the config: always rebuilt, never loaded or stored.
RECOMPUTED_BUFFER = re.compile(r"^(encoder|decoder)\.(version|token_rp_bucket|image_rp_bucket|image_position_idx)$")

# fairseq argument name -> OFAConfig field (spec §4.1; encoder and decoder sizes must agree).
_FAIRSEQ_FIELDS = {
    "encoder_embed_dim": "d_model",
    "decoder_embed_dim": "d_model",
    "encoder_ffn_embed_dim": "ffn_dim",
    "decoder_ffn_embed_dim": "ffn_dim",
    "encoder_attention_heads": "heads",
    "decoder_attention_heads": "heads",
    "encoder_layers": "encoder_layers",
    "decoder_layers": "decoder_layers",
    "resnet_type": "resnet",
    "max_source_positions": "max_source_positions",
    "max_target_positions": "max_target_positions",
    "token_bucket_size": "token_bucket_size",
    "image_bucket_size": "image_bucket_size",
    "code_image_size": "code_image_size",
    "attn_scale_factor": "attn_scale_factor",
    "scale_attn": "scale_attn",
    "scale_fc": "scale_fc",
    "scale_heads": "scale_heads",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "encoder_drop_path_rate": "encoder_drop_path_rate",
    "decoder_drop_path_rate": "decoder_drop_path_rate",
    "resnet_drop_path_rate": "resnet_drop_path_rate",
}
# OFA-OCR's `--resnet-type` value for its ViT-B/16 stem (spec-ext §10.2.4)
VIT_RESNET_TYPE = "ViT-B/16"
# OFA options our model does not implement: (value that is unsupported, why).
_UNSUPPORTED_OPTIONS = {
    "disable_entangle": (False, "the decoder would add text positions to its inputs (entangled positions)"),
    "entangle_position_embedding": (True, "the encoder would add positions to its inputs (entangled positions)"),
    "scale_resids": (True, "the layers would carry w_resid residual scales"),
    "share_all_embeddings": (False, "encoder and decoder would have separate token embeddings"),
    "encoder_normalize_before": (False, "the encoder would be post-LN"),
    "decoder_normalize_before": (False, "the decoder would be post-LN"),
    "add_type_embedding": (False, "the encoder would have no type embedding"),
}


# ----------------------------------------------------------------------------------------------- config
def _get(source: Any, name: str, default: Any = None) -> Any:
    if source is None:
        return default
    if isinstance(source, Mapping):
        return source.get(name, default)
    return getattr(source, name, default)


def fairseq_model_args(ckpt: Mapping) -> Any:
    """The model hyper-parameters of a fairseq checkpoint: `cfg["model"]` (dict or Namespace) or `args`."""
    cfg = ckpt.get("cfg")
    model_args = _get(cfg, "model") if cfg is not None else None
    if model_args is None:
        model_args = ckpt.get("args")
    return model_args


def config_from_fairseq_args(model_args: Any) -> OFAConfig:
    """OFAConfig from fairseq model args: preset of `arch` (or ofa_large, whose architecture function supplies
    every default in OFA), then every explicit dimension/flag the args carry."""
    arch = str(_get(model_args, "arch", "") or "")
    for option, (bad, why) in _UNSUPPORTED_OPTIONS.items():
        value = _get(model_args, option)
        if value is not None and bool(value) == bad:
            raise UserError(f"checkpoint has {option}={value}: {why}, which ofa-scale does not implement; "
                            f"only OFA checkpoints trained with the standard OFA flags can be imported")
    base = arch if arch in PRESETS else "ofa_large"
    fields: dict[str, Any] = dataclasses.asdict(OFAConfig.preset(base))
    fields["arch"] = arch or "custom"
    seen: dict[str, tuple[str, Any]] = {}
    for fs_name, field in _FAIRSEQ_FIELDS.items():
        value = _get(model_args, fs_name)
        if value is None:
            continue
        if field in seen and seen[field][1] != value:
            raise UserError(f"checkpoint config has {seen[field][0]}={seen[field][1]} but {fs_name}={value}; "
                            f"ofa-scale needs equal encoder and decoder sizes")
        seen[field] = (fs_name, value)
        fields[field] = value
    if fields["resnet"] == VIT_RESNET_TYPE:  # OFA-OCR's ViT stem (spec-ext §10.2.4); `resnet` then unused
        fields["image_stem"], fields["resnet"] = "vit_b16", OFAConfig.preset(base).resnet
    if fields["resnet"] not in RESNET_BLOCKS:
        raise UserError(f"checkpoint uses resnet_type={fields['resnet']!r}; ofa-scale supports "
                        f"{', '.join(RESNET_BLOCKS)}")
    fields.update(_prompt_fields_from_args(model_args))
    try:
        cfg = from_dict(OFAConfig, fields)
        cfg.validate()
    except ConfigError as e:
        raise UserError(f"checkpoint config is not a valid OFA architecture: {e}") from None
    return cfg


def config_from_shapes(state: Mapping[str, torch.Tensor]) -> OFAConfig:
    """OFAConfig inferred from tensor shapes alone (checkpoints saved without `cfg`/`args`)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise UserError(f"checkpoint has no config and no '{key}' tensor to infer the architecture from; "
                            "pass the architecture with --set (e.g. --set arch=ofa_base)")
        return tuple(state[key].shape)

    def count(prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return 1 + max((int(m.group(1)) for k in state if (m := pat.match(k))), default=-1)

    vocab, d = shape(EMBEDDING_KEY)
    vit = "encoder.embed_images.transformer.resblocks.0.attn.in_proj_weight" in state
    layer3 = count("encoder.embed_images.layer3.")
    resnet = OFAConfig.resnet if vit else next(
        (name for name, blocks in RESNET_BLOCKS.items() if blocks[2] == layer3), None)
    if resnet is None:
        raise UserError(f"cannot infer the ResNet depth from {layer3} layer3 blocks; pass --set resnet=...")
    fields = dict(
        d_model=d, vocab_size=vocab, ffn_dim=shape("encoder.layers.0.fc1.weight")[0],
        heads=shape("encoder.token_rel_pos_table_list.0.weight")[1],
        encoder_layers=count("encoder.layers."), decoder_layers=count("decoder.layers."), resnet=resnet,
        image_stem="vit_b16" if vit else "resnet",
        max_source_positions=shape("encoder.embed_positions.weight")[0] - 2,
        max_target_positions=shape("decoder.embed_positions.weight")[0] - 2,
        token_bucket_size=(shape("encoder.token_rel_pos_table_list.0.weight")[0] + 1) // 2,
        image_bucket_size=math.isqrt(shape("encoder.embed_image_positions.weight")[0] - 1),
        scale_attn="encoder.layers.0.attn_ln.weight" in state,
        scale_fc="encoder.layers.0.ffn_layernorm.weight" in state,
        scale_heads="encoder.layers.0.self_attn.c_attn" in state,
    )
    arch = next((name for name, preset in PRESETS.items()
                 if all(fields[k] == v for k, v in preset.items())), "custom")
    return OFAConfig(arch=arch, **fields, **_prompt_fields_from_shapes(state))


def _apply_config_overrides(cfg: OFAConfig, overrides: Mapping[str, Any] | list[str] | None) -> OFAConfig:
    if not overrides:
        return cfg
    data = dataclasses.asdict(cfg)
    if isinstance(overrides, Mapping):
        data.update(overrides)
    else:
        data = apply_overrides(data, list(overrides))
    new = from_dict(OFAConfig, data)
    new.validate()
    return new


# ----------------------------------------------------------------------------------------------- state dicts
def _describe_keys(keys: list[str], limit: int = 12) -> str:
    """Readable listing: layer indices folded into '*' with a count (e.g. 'encoder.layers.*.attn_ln.weight ×4')."""
    groups: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        groups[re.sub(r"\.\d+(?=\.|$)", ".*", k)].append(k)
    items = [f"{p} ×{len(ks)}" if len(ks) > 1 else ks[0] for p, ks in sorted(groups.items())]
    more = f", … and {len(items) - limit} more patterns" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def canonical_keys(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Stored keys of a model (its state dict without recomputed buffers and tied duplicates) -> shape, dtype."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()
            if not RECOMPUTED_BUFFER.match(k) and k not in TIED_EMBEDDING_KEYS[1:]}


def canonical_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` stores: each once, contiguous, detached."""
    sd = model.state_dict()
    return {k: v.detach().contiguous() for k, v in sd.items()
            if not RECOMPUTED_BUFFER.match(k) and k not in TIED_EMBEDDING_KEYS[1:]}


def _untie(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Fold the three shared-embedding keys into EMBEDDING_KEY (they must hold the same values)."""
    present = [k for k in TIED_EMBEDDING_KEYS if k in state]
    out = {k: v for k, v in state.items() if k not in TIED_EMBEDDING_KEYS}
    if not present:
        return out
    first = state[present[0]]
    for k in present[1:]:
        other = state[k]
        if other.shape != first.shape or not torch.equal(other, first):
            raise UserError(f"{source}: '{k}' differs from '{present[0]}', but OFA shares one token embedding "
                            "between encoder, decoder and output projection; this checkpoint is not an OFA model")
    out[EMBEDDING_KEY] = first
    return out


def _fit_rows(tensor: torch.Tensor, rows: int, name: str, generator: torch.Generator, *, allow_truncate: bool,
              truncate_hint: str) -> torch.Tensor:
    have = tensor.shape[0]
    if have == rows:
        return tensor
    if have > rows:
        if not allow_truncate:
            raise UserError(f"'{name}' has {have} rows but the model needs {rows}; {truncate_hint}")
        log.warning("dropping rows %d..%d of %s (the model uses %d)", rows, have - 1, name, rows)
        return tensor[:rows].clone()
    dim = tensor.shape[1]
    extra = torch.randn(rows - have, dim, generator=generator, dtype=torch.float32) * dim**-0.5
    log.info("appending %d rows ~ N(0, d^-0.5) to %s (%d -> %d)", rows - have, name, have, rows)
    return torch.cat([tensor, extra.to(tensor.dtype)], dim=0)


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    source: str,
    seed: int = 0,
    truncate_vocab: bool = False,
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the model's stored tensors: strict keys, dtype cast, tie folded, rows fitted.

    `expected` is `canonical_keys(model)`. Raises one UserError listing every unknown/missing key and every
    shape mismatch.
    """
    state = {k: v for k, v in state.items() if not RECOMPUTED_BUFFER.match(k)}
    bad_types = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_types:
        raise UserError(f"{source}: entries that are not tensors: {_describe_keys(bad_types)}")
    state = _untie(state, source)
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown keys: {_describe_keys(unknown)}")
        if missing:
            parts.append(f"{len(missing)} missing keys: {_describe_keys(missing)}")
        raise UserError(f"{source} does not match the model architecture ({'; '.join(parts)}); check that it is "
                        "an OFA checkpoint and that its config describes it, or correct the config with --set")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    mismatched = []
    for key in expected:  # model order, so appended rows are drawn in a fixed order
        shape, dtype = expected[key]
        t = state[key]
        t = t.to(dtype) if t.dtype != dtype else t
        if key == EMBEDDING_KEY and t.dim() == 2 and t.shape[1] == shape[1]:
            t = _fit_rows(t, shape[0], key, generator, allow_truncate=truncate_vocab,
                          truncate_hint="pass vocab_size >= the checkpoint's rows, or truncate_vocab=True "
                                        "(--truncate-vocab) to drop the extra tokens")
        elif key in IMAGE_POSITION_KEYS and t.dim() == 2 and t.shape[1] == shape[1]:
            t = _fit_rows(t, shape[0], key, generator, allow_truncate=True, truncate_hint="")
        if tuple(t.shape) != shape:
            mismatched.append(f"{key} {tuple(t.shape)} vs model {shape}")
        out[key] = t.contiguous()
    if mismatched:
        listed = "; ".join(mismatched[:12]) + (f"; … and {len(mismatched) - 12} more" if len(mismatched) > 12 else "")
        raise UserError(f"{source}: {len(mismatched)} tensors have the wrong shape for the model ({listed}); "
                        "check the architecture settings")
    return out


def build_model(config: OFAConfig, weights: Mapping[str, torch.Tensor]):
    """Build an OFAModel whose parameters *are* `weights` (no random init, no copy), index buffers rebuilt."""
    from ofa_scale.model.ofa import OFAModel

    with torch.device("meta"):
        model = OFAModel(config)
    missing, unexpected = model.load_state_dict(dict(weights), strict=False, assign=True)
    leftover = [k for k in missing if not RECOMPUTED_BUFFER.match(k) and k not in TIED_EMBEDDING_KEYS[1:]]
    if leftover or unexpected:  # convert_state_dict checked this already; reaching here is a bug of ours
        raise RuntimeError(f"internal key mismatch: missing {leftover}, unexpected {unexpected}")
    model.tie_embeddings()
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype)
    model.reset_index_buffers()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"internal: tensors left on meta after loading: {still_meta[:5]}")
    return model.eval()


def _expected_for(config: OFAConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from ofa_scale.model.ofa import OFAModel

    with torch.device("meta"):
        return canonical_keys(OFAModel(config))


# ----------------------------------------------------------------------------------------------- fairseq import
@dataclasses.dataclass
class ImportReport:
    config: OFAConfig
    source_dtypes: dict[str, int]  # dtype name -> number of tensors in the checkpoint
    config_source: str  # "cfg.model", "args" or "shapes"
    used_ema: bool
    tokenizer_kind: str = "gpt2-bpe"  # OFA-CN (bpe=bert): "bert", see checkpoint_tokenizer_kind


def read_fairseq_checkpoint(
    path: str | Path,
    *,
    vocab_size: int | None = None,
    use_ema: bool = False,
    truncate_vocab: bool = False,
    seed: int = 0,
    config_overrides: Mapping[str, Any] | list[str] | None = None,
) -> tuple[OFAConfig, dict[str, torch.Tensor], ImportReport]:
    """Read a fairseq OFA checkpoint -> (config, fp32 canonical weights, report). See the module docstring."""
    path = Path(path)
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        raise UserError(f"{path} is not a fairseq checkpoint (expected a dict with a 'model' entry)")
    state = ckpt["model"]
    if use_ema:
        extra = ckpt.get("extra_state") or {}
        if not isinstance(extra, Mapping) or not isinstance(extra.get("ema"), Mapping):
            raise UserError(f"{path} has no EMA weights (extra_state['ema']); import it without --ema")
        state = extra["ema"]
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: 'model' is not a state dict")
    model_args = fairseq_model_args(ckpt)
    if model_args is not None:
        config = config_from_fairseq_args(model_args)
        origin = "cfg.model" if isinstance(ckpt.get("cfg"), Mapping) and ckpt["cfg"].get("model") is not None \
            else "args"
    else:
        config = config_from_shapes(state)
        origin = "shapes"
    if EMBEDDING_KEY in state or TIED_EMBEDDING_KEYS[1] in state:
        emb = state.get(EMBEDDING_KEY, state.get(TIED_EMBEDDING_KEYS[1]))
        config = dataclasses.replace(config, vocab_size=int(emb.shape[0]))
    if vocab_size is not None:
        config = dataclasses.replace(config, vocab_size=int(vocab_size))
    config = _apply_config_overrides(config, config_overrides)
    dtypes: dict[str, int] = defaultdict(int)
    for v in state.values():
        if isinstance(v, torch.Tensor):
            dtypes[str(v.dtype).replace("torch.", "")] += 1
    state = split_ofa_prompt_tables(state, config, source=str(path))
    weights = convert_state_dict(state, _expected_for(config), source=str(path), seed=seed,
                                 truncate_vocab=truncate_vocab)
    return config, weights, ImportReport(config, dict(dtypes), origin, use_ema, checkpoint_tokenizer_kind(ckpt))


# ---- OFA-CN (issue 13 §1, spec §10.1.3) -------------------------------------------------------------------------
# OFA-CN checkpoints differ from the English ones only in the three (tied) vocabulary-sized tensors: [30325, d]
# for BERT-CN's 21,128 pieces + <mask> + 8192 codes + 1000 bins, read above like any other row count. What the
# weights cannot say is which tokenizer their rows belong to: fairseq records it as the task's `bpe` option.
def checkpoint_tokenizer_kind(ckpt: Mapping) -> str:
    """"bert" for a checkpoint trained with `bpe=bert` (OFA-CN: cfg.task.bpe, or legacy args.bpe), else
    "gpt2-bpe" (OFAConfig.bpe's default)."""
    cfg = ckpt.get("cfg")
    bpe = _get(_get(cfg, "task"), "bpe") if cfg is not None else None
    if bpe is None:
        bpe = _get(ckpt.get("args"), "bpe")
    return "bert" if str(bpe) == "bert" else "gpt2-bpe"


def check_tokenizer_rows(config: OFAConfig, kind: str, path: str | Path, source: str) -> int:
    """Refuse an import whose token embedding does not have one row per id of the tokenizer it will run with
    (e.g. an OFA-CN checkpoint with the GPT-2 BPE); returns the tokenizer's size."""
    from ofa_scale.data.tokenizer import load_tokenizer

    size = len(load_tokenizer(kind, path))
    if size != config.vocab_size:
        raise UserError(f"{source} has {config.vocab_size} token embeddings but the {kind} tokenizer in {path} has "
                        f"{size} ids; pass the tokenizer this checkpoint was trained with (OFA-CN: --tokenizer-kind "
                        f"bert with the directory of OFA's utils/BERT_CN_dict/vocab.txt)")
    return size


# ---- OFA's prompt-tuned checkpoints (issue 13 §3, spec §10.3) --------------------------------------------------
# A prompt-tuned OFA .pt is a whole model: the base's tensors plus, for prefix tuning, one
# `{side}.{side}_prompt_encoder.embedding.weight` [L_p, 2·layers·d] per side (our per-layer key/value tables in
# OFA's layout, model/prompt_tuning.py), and for adapters `{side}.layers.{i}.adapter.{down,up}_proj.*` (the same
# names as ours). The run's args say which (`--encoder-prompt`, `--adapter`, ...); BitFit adds no tensor.
OFA_PROMPT_TABLE = "{side}.{side}_prompt_encoder.embedding.weight"
_OFA_PROMPT_PROJECTION = re.compile(r"^(encoder|decoder)\.\1_prompt_encoder\.trans\.")
_SIDES = ("encoder", "decoder")


def _prompt_fields_from_args(model_args: Any) -> dict[str, int]:
    """OFAConfig's prompt-tuning fields from OFA's --{encoder,decoder}-prompt* and --adapter* options."""
    fields = {}
    for side in _SIDES:
        on = bool(_get(model_args, f"{side}_prompt", False))
        if on and _get(model_args, f"{side}_prompt_projection", False):
            raise UserError(f"checkpoint was prompt-tuned with --{side}-prompt-projection (OFA's reparameterisation "
                            f"MLP), which ofa-scale does not implement; no OFA script uses it")
        if on and str(_get(model_args, f"{side}_prompt_type", "prefix")) != "prefix":
            raise UserError(f"checkpoint uses --{side}-prompt-type={_get(model_args, f'{side}_prompt_type')}; only "
                            f"OFA's prefix prompts can be imported")
        fields[f"{side}_prompt_length"] = int(_get(model_args, f"{side}_prompt_length", 100)) if on else 0
    fields["adapter_dim"] = int(_get(model_args, "adapter_dim", 200)) if _get(model_args, "adapter", False) else 0
    return fields


def _prompt_fields_from_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The same fields from the tensors alone (checkpoints without args)."""
    fields = {}
    for side in _SIDES:
        table = state.get(OFA_PROMPT_TABLE.format(side=side))
        fields[f"{side}_prompt_length"] = int(table.shape[0]) if table is not None else 0
    down = state.get("encoder.layers.0.adapter.down_proj.weight")
    fields["adapter_dim"] = int(down.shape[0]) if down is not None else 0
    return fields


def split_ofa_prompt_tables(state: Mapping[str, torch.Tensor], config: OFAConfig, *,
                            source: str) -> dict[str, torch.Tensor]:
    """`state` with OFA's per-side prefix tables replaced by our per-layer key/value tables (each side the config
    prompts; a table the config does not expect is left for convert_state_dict to report as unknown)."""
    from ofa_scale.model.prompt_tuning import from_ofa_prefix_layout

    projection = sorted(k for k in state if _OFA_PROMPT_PROJECTION.match(k))
    if projection:
        raise UserError(f"{source} holds OFA's prompt reparameterisation MLP ({_describe_keys(projection)}), which "
                        f"ofa-scale does not implement")
    out = dict(state)
    for side in _SIDES:
        key, length = OFA_PROMPT_TABLE.format(side=side), getattr(config, f"{side}_prompt_length")
        if key not in out or not length:
            continue
        layers = getattr(config, f"{side}_layers")
        table = out.pop(key)
        need = (length, 2 * layers * config.d_model)
        if tuple(table.shape) != need:
            raise UserError(f"{source}: '{key}' has shape {tuple(table.shape)} but {layers} {side} layers of width "
                            f"{config.d_model} with prompt length {length} need {need}")
        out.update(from_ofa_prefix_layout(table, side, layers))
    return out


def recorded_tokenizer_kind(path: str | Path) -> str | None:
    """The tokenizer kind an `ofa-convert import-ofa` model directory recorded (`extra.tokenizer_kind`: "bert" for
    OFA-CN), or None when `path` is not a model directory or recorded none."""
    cfg_path = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    kind = (meta.get("extra") or {}).get("tokenizer_kind") if isinstance(meta, dict) else None
    return kind if isinstance(kind, str) else None


def import_fairseq_checkpoint(path: str | Path, **kwargs):
    """Read a fairseq OFA checkpoint into an OFAModel (eval mode, fp32). kwargs: see read_fairseq_checkpoint."""
    config, weights, _ = read_fairseq_checkpoint(path, **kwargs)
    return build_model(config, weights)


# ----------------------------------------------------------------------------------------------- our format
def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors straight to a temp file beside `path`, fsync, rename (no second in-memory copy of the
    weights, which matters for ofa_huge)."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: torch.nn.Module, out_dir: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write DIR/model.safetensors + DIR/config.json atomically (config last: its presence marks completeness)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: OFAConfig = model.config
    tensors = {k: v.to("cpu") for k, v in canonical_state_dict(model).items()}
    _atomic_save_safetensors(tensors, out / WEIGHTS_FILE,
                             metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
    atomic_write_json(out / CONFIG_FILE, {
        "format_version": FORMAT_VERSION,
        "kind": "ofa-scale pretrained model",
        "model": dataclasses.asdict(config),
        "weights": WEIGHTS_FILE,
        "tied": {k: EMBEDDING_KEY for k in TIED_EMBEDDING_KEYS[1:]},
        "recomputed_buffers": RECOMPUTED_BUFFER.pattern,
        **({"extra": dict(extra)} if extra else {}),
    })
    return out


def read_pretrained_dir(path: str | Path) -> tuple[OFAConfig, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise UserError(f"{path} is not an ofa-scale model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                        "create one with `ofa-convert import-ofa CKPT.pt --out DIR`")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); re-export the model") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise UserError(f"{cfg_path} has format_version {version!r}; this ofa-scale reads versions 1.."
                        f"{FORMAT_VERSION}, upgrade ofa-scale or re-export the model")
    try:
        config = from_dict(OFAConfig, meta.get("model") or {}, prefix="model")
        config.validate()
    except ConfigError as e:
        raise UserError(f"{cfg_path}: {e}") from None
    try:
        weights = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights_path} is not a readable safetensors file ({e}); re-export the model") from None
    return config, weights


def load_pretrained(
    path: str | Path,
    *,
    vocab_size: int | None = None,
    truncate_vocab: bool = False,
    use_ema: bool = False,
    seed: int = 0,
    config_overrides: Mapping[str, Any] | list[str] | None = None,
):
    """OFAModel (eval mode) from an ofa-scale model DIR or directly from a fairseq .pt checkpoint.

    `vocab_size` resizes the token embedding (appending rows, see module docstring); `config_overrides` changes
    config fields that do not alter shapes (e.g. {"attention_impl": "math", "dropout": 0.1}).
    """
    path = Path(path)
    if path.is_dir():
        config, weights = read_pretrained_dir(path)
        if vocab_size is not None:
            config = dataclasses.replace(config, vocab_size=int(vocab_size))
        config = _apply_config_overrides(config, config_overrides)
        weights = convert_state_dict(weights, _expected_for(config), source=str(path / WEIGHTS_FILE), seed=seed,
                                     truncate_vocab=truncate_vocab)
        return build_model(config, weights)
    if path.is_file():
        return import_fairseq_checkpoint(path, vocab_size=vocab_size, truncate_vocab=truncate_vocab,
                                         use_ema=use_ema, seed=seed, config_overrides=config_overrides)
    raise UserError(f"{path} does not exist; pass an ofa-scale model directory or a fairseq .pt checkpoint")


# ----------------------------------------------------------------------------------------------- CLI glue
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`ofa-convert import-ofa CKPT.pt --out DIR`."""
    parser.add_argument("checkpoint", help="fairseq/OFA checkpoint (.pt), e.g. ofa_base.pt")
    parser.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    parser.add_argument("--ema", action="store_true", help="import the EMA weights (extra_state['ema'])")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="resize the token embedding to this many rows (new rows ~ N(0, d^-0.5))")
    parser.add_argument("--truncate-vocab", action="store_true",
                        help="allow --vocab-size below the checkpoint's vocabulary (drops the extra tokens)")
    parser.add_argument("--seed", type=int, default=0, help="seed for appended embedding rows")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an OFAConfig field of the inferred architecture (repeatable)")
    # OFA-CN (issue 13 §1): check the embedding rows against the tokenizer the model will be used with
    from ofa_scale.data.tokenizer import KINDS

    parser.add_argument("--tokenizer-kind", choices=KINDS, default=None,
                        help="tokenizer kind for --tokenizer-path (default: the checkpoint's bpe option: bert for "
                             "OFA-CN checkpoints, else gpt2-bpe)")
    parser.add_argument("--tokenizer-path", default=None,
                        help="tokenizer directory (OFA-CN: the one holding BERT_CN_dict's vocab.txt); the import "
                             "is refused unless the token embedding has exactly one row per tokenizer id")


def run(args: argparse.Namespace) -> int:
    from ofa_scale.cli import require_empty_out

    require_empty_out(args.out)
    t0 = time.perf_counter()
    config, weights, report = read_fairseq_checkpoint(
        args.checkpoint, vocab_size=args.vocab_size, use_ema=args.ema, truncate_vocab=args.truncate_vocab,
        seed=args.seed, config_overrides=args.overrides)
    kind = args.tokenizer_kind or report.tokenizer_kind
    if args.tokenizer_path:
        check_tokenizer_rows(config, kind, args.tokenizer_path, args.checkpoint)
    model = build_model(config, weights)
    out = save_pretrained(model, args.out, extra={
        "imported_from": str(Path(args.checkpoint).resolve()), "config_source": report.config_source,
        "source_dtypes": report.source_dtypes, "ema": report.used_ema, "tokenizer_kind": kind})
    n_params = sum(p.numel() for p in model.parameters())
    prompt = "".join(f" {name}={getattr(config, name)}" for name in ("encoder_prompt_length", "decoder_prompt_length",
                                                                     "adapter_dim") if getattr(config, name))
    print(f"imported {args.checkpoint}: arch={config.arch} d_model={config.d_model} layers="
          f"{config.encoder_layers}/{config.decoder_layers}{prompt} vocab={config.vocab_size} params={n_params:,} "
          f"(config from {report.config_source}; source dtypes {report.source_dtypes}; tokenizer {kind}) -> {out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0

"""VQGAN configuration from a taming-transformers `model.yaml` (spec §10.5.1).

Only what shapes the network is read: `target` (GumbelVQ or VQModel), `embed_dim`, `n_embed` and `ddconfig`.
Training-only entries (`lossconfig`, `temperature_scheduler_config`, `monitor`, learning rates) are ignored, and
their `target` strings are never imported: the YAML is data, not code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ofa_scale.errors import ConfigError

# taming's class names, by the suffix of `model.target` (OFA's copy is `models.taming.models.vqgan.GumbelVQ`)
QUANTIZERS = {"GumbelVQ": "gumbel", "VQModel": "vq"}
_TARGETS = {"gumbel": "taming.models.vqgan.GumbelVQ", "vq": "taming.models.vqgan.VQModel"}
# ddconfig options of taming's Encoder/Decoder that change nothing we build when they have these values
_INERT = {"resamp_with_conv": True, "give_pre_end": False, "use_linear_attn": False, "attn_type": "vanilla"}


@dataclass(frozen=True)
class DDConfig:
    """taming's `ddconfig` (Encoder/Decoder shape). `norm_groups` is ours: taming fixes 32 GroupNorm groups."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    dropout: float = 0.0
    in_channels: int = 3
    resolution: int = 256
    z_channels: int = 256
    double_z: bool = False
    tanh_out: bool = False
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class VQGANConfig:
    """The whole model: quantizer kind ("gumbel" = OFA's GumbelVQ, "vq" = nearest-code VQModel) and sizes."""

    quantizer: str = "gumbel"
    n_embed: int = 8192
    embed_dim: int = 256
    ddconfig: DDConfig = DDConfig()
    kl_weight: float = 1e-8  # Gumbel KL prior weight (training only)
    beta: float = 0.25  # VQ commitment weight (training only)

    @property
    def downsample_factor(self) -> int:
        return self.ddconfig.downsample_factor

    def to_yaml_dict(self) -> dict[str, Any]:
        """A taming-style `model.yaml` document for this config (what `save_taming_checkpoint` writes)."""
        dd = dataclasses.asdict(self.ddconfig)
        dd["ch_mult"], dd["attn_resolutions"] = list(dd["ch_mult"]), list(dd["attn_resolutions"])
        if dd["norm_groups"] == 32:
            del dd["norm_groups"]
        params: dict[str, Any] = {"embed_dim": self.embed_dim, "n_embed": self.n_embed, "ddconfig": dd,
                                  "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
        if self.quantizer == "gumbel":
            params["kl_weight"] = self.kl_weight
        return {"model": {"target": _TARGETS[self.quantizer], "params": params}}


def _int_tuple(value: Any, key: str, where: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"{where}: ddconfig.{key} must be a list of positive integers, got {value!r}")
    return tuple(value)


def _ddconfig(raw: Any, where: str) -> DDConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: model.params.ddconfig is missing or not a mapping")
    raw = dict(raw)
    for key, inert in _INERT.items():
        if key in raw and raw.pop(key) != inert:
            raise ConfigError(f"{where}: ddconfig.{key} other than {inert!r} is not supported")
    fields = {f.name for f in dataclasses.fields(DDConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown ddconfig keys {', '.join(unknown)}")
    missing = sorted({"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels"} - set(raw))
    if missing:
        raise ConfigError(f"{where}: ddconfig lacks {', '.join(missing)}")
    for key in ("ch_mult", "attn_resolutions"):
        raw[key] = _int_tuple(raw[key], key, where) if raw[key] != [] else ()
    dd = DDConfig(**raw)
    if dd.double_z:
        raise ConfigError(f"{where}: ddconfig.double_z is true; a VQGAN encoder has double_z: false")
    return dd


def config_from_yaml_dict(doc: Any, where: str = "model.yaml") -> VQGANConfig:
    """Parse a taming `model.yaml` document (`{model: {target, params}}`, or just its `model` mapping)."""
    model = doc.get("model", doc) if isinstance(doc, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise ConfigError(f"{where} is not a taming model config (expected model: {{target: ..., params: ...}})")
    target = str(model.get("target", ""))
    kind = QUANTIZERS.get(target.rsplit(".", 1)[-1])
    if kind is None:
        raise ConfigError(f"{where}: model.target {target!r} is not a taming GumbelVQ or VQModel")
    params = model["params"]
    if params.get("remap") is not None:
        raise ConfigError(f"{where}: codebook remapping (params.remap) is not supported")
    try:
        n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: model.params needs integer n_embed and embed_dim") from None
    dd = _ddconfig(params.get("ddconfig"), where)
    if kind == "gumbel" and dd.z_channels != embed_dim:
        # GumbelVQ feeds quant_conv's embed_dim channels to a quantizer built for z_channels (spec §10.5.2)
        raise ConfigError(f"{where}: a GumbelVQ needs ddconfig.z_channels == embed_dim "
                          f"({dd.z_channels} != {embed_dim})")
    return VQGANConfig(kind, n_embed, embed_dim, dd, float(params.get("kl_weight", 1e-8)),
                       float(params.get("beta", 0.25)))


def load_config(path: str | Path) -> VQGANConfig:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return config_from_yaml_dict(doc, str(path))


__all__ = ["DDConfig", "VQGANConfig", "config_from_yaml_dict", "load_config", "QUANTIZERS"]

"""Build the DeepSpeed config from a ds_configs/ template and the YAML, so the two can never disagree.

The template carries what is DeepSpeed-specific (ZeRO buckets, offload, prefetching). The trainer owns batch sizes,
precision, the optimizer, clipping and the ZeRO stage: it fills them from the YAML, and a template that sets one of
them to a different value is refused with the key to delete (silently overriding would hide a stale template).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ofa_scale.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = REPO_ROOT / "ds_configs"

# Top-level DeepSpeed keys no template may use: we pass our own scheduler object to deepspeed.initialize.
FORBIDDEN_KEYS = {"scheduler": "the learning-rate schedule comes from the YAML's schedule section"}


def default_template(zero_stage: int, offload: bool) -> Path:
    if offload:
        return TEMPLATE_DIR / "zero3_offload.json"
    # ZeRO-0 (plain data parallel) shares the ZeRO-1 template; the stage itself is filled in below.
    return TEMPLATE_DIR / f"zero{max(zero_stage, 1)}.json"


def load_template(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed template {path} does not exist; point deepspeed.template at a JSON file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed template {path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file")\
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed template {path} must hold a JSON object")
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys are for people


def owned_values(cfg, dp_size: int, grad_accum: int, on_cpu: bool) -> dict[str, Any]:
    """Every DeepSpeed key the YAML decides, as a nested dict (cfg is a TrainingConfig)."""
    o = cfg.optim
    adamw_params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if on_cpu:
        # DeepSpeed's fused/CPU Adam kernels need a compiler toolchain at start-up; torch's AdamW computes the same
        # update on CPU without building anything.
        adamw_params["torch_adam"] = True
    values: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": o.clip_norm,
        "optimizer": {"type": "AdamW", "params": adamw_params},
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "bf16": {"enabled": cfg.precision == "bf16"},
    }
    if cfg.precision == "fp16":
        ls = cfg.loss_scale
        values["fp16"].update({"loss_scale": ls.static_loss_scale, "initial_scale_power": ls.initial_scale_power,
                               "loss_scale_window": ls.loss_scale_window, "hysteresis": ls.hysteresis,
                               "min_loss_scale": ls.min_loss_scale})
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size * grad_accum * dp_size
    return values


def build_ds_config(cfg, dp_size: int, grad_accum: int, on_cpu: bool, template: str | Path | None = None) -> dict:
    """The full DeepSpeed config dict: template + YAML-owned values (conflicts refused)."""
    path = Path(template or cfg.deepspeed.template or default_template(cfg.parallel.zero_stage, cfg.deepspeed.offload))
    base = load_template(path)
    for key, why in FORBIDDEN_KEYS.items():
        if key in base:
            raise ConfigError(f"DeepSpeed template {path} sets '{key}'; remove it ({why})")
    owned = owned_values(cfg, dp_size, grad_accum, on_cpu)
    _refuse_conflicts(base, owned, path, "")
    merged = _merge(copy.deepcopy(base), owned)
    if on_cpu:
        _unpin(merged)
        if "offload_optimizer" in merged.get("zero_optimization", {}):
            # DeepSpeed insists on its compiled CPU Adam under offload unless told that torch's AdamW is fine.
            merged["zero_force_ds_cpu_optimizer"] = False
    return merged


def _refuse_conflicts(template: dict, owned: dict, path: Path, prefix: str) -> None:
    for key, value in owned.items():
        if key not in template:
            continue
        where = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(template[key], dict):
            _refuse_conflicts(template[key], value, path, f"{where}.")
        elif template[key] != value:
            raise ConfigError(
                f"DeepSpeed template {path} sets {where}={json.dumps(template[key])} but the YAML gives "
                f"{json.dumps(value)}; remove {where} from the template (ofa-train fills it from the YAML)")


def _merge(base: dict, owned: dict) -> dict:
    for key, value in owned.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _unpin(config: dict) -> None:
    # Pinned host memory only exists next to a GPU; on a CPU-only run the offload targets are ordinary memory.
    zero = config.get("zero_optimization", {})
    for section in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(section), dict):
            zero[section]["pin_memory"] = False

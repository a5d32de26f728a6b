"""Read and write taming-transformers VQGAN checkpoints: DIR/model.yaml + DIR/last.ckpt (spec §10.5.1, §10.5.3).

`last.ckpt` is a PyTorch-Lightning pickle. It is read with `safe_torch_load` (weights-only unpickling, the OFA
importer's allow-list), never with plain `torch.load`. Old Lightning versions key their `callbacks` dict by the
callback *class* (e.g. `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`), so those names — and only
Lightning's — are admitted as inert type names; anything that would be called or built still refuses the file.

Loading is strict: OFA loads with `strict=False`, which would silently leave a mismatched decoder random. Here
every tensor the architecture of model.yaml needs must be present with its shape, and nothing else may be, except
the `loss.*` entries (discriminator, LPIPS) that a training checkpoint carries and inference never uses.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from ofa_scale.errors import UserError
from ofa_scale.model.safe_load import TypeRef, allowed_globals, safe_torch_load
from ofa_scale.utils.io import atomic_write_file, atomic_write_text
from ofa_scale.vqgan.config import load_config
from ofa_scale.vqgan.model import VQGAN

CONFIG_FILE = "model.yaml"
CKPT_FILE = "last.ckpt"
TRAINING_ONLY_PREFIXES = ("loss.",)
_LIGHTNING_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_SHOWN = 5


def _lightning_type_names(path: Path) -> list[tuple[Any, str]]:
    """Lightning class names the pickle mentions, each admitted as an inert `TypeRef` (a dict key, never called)."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by safe_torch_load itself
        return []
    return [(TypeRef(n), n) for n in names if n.startswith(_LIGHTNING_MODULES)]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a taming `last.ckpt` (its `state_dict` entry), read without executing pickled code."""
    path = Path(path)
    extra = _lightning_type_names(path) if path.is_file() else []
    with torch.serialization.safe_globals(extra):
        ckpt = safe_torch_load(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a taming VQGAN checkpoint (expected a dict whose 'state_dict' maps names "
                        "to tensors)")
    return dict(state)


def _listing(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_state_strict(model: VQGAN, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, refusing any missing, extra or mis-shaped tensor with one clear message."""
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise UserError(f"{source} lacks {len(missing)} tensor(s) that the model.yaml architecture needs "
                        f"({_listing(missing)}); the checkpoint and model.yaml do not belong together")
    if extra:
        raise UserError(f"{source} holds {len(extra)} tensor(s) that the model.yaml architecture has no place for "
                        f"({_listing(extra)}); the checkpoint and model.yaml do not belong together")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"{source} has {len(wrong)} tensor(s) whose shape differs from model.yaml's architecture "
                        f"({_listing(wrong)}); the checkpoint and model.yaml do not belong together")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _files(directory: Path) -> tuple[Path, Path]:
    if not directory.is_dir():
        raise UserError(f"VQGAN directory {directory} does not exist; pass the folder holding {CONFIG_FILE} and "
                        f"{CKPT_FILE} (OFA ships them as vqgan/ in image_gen_large_best.zip)")
    files = directory / CONFIG_FILE, directory / CKPT_FILE
    absent = [p.name for p in files if not p.is_file()]
    if absent:
        raise UserError(f"VQGAN directory {directory} lacks {' and '.join(absent)}; it must hold {CONFIG_FILE} and "
                        f"{CKPT_FILE}")
    return files


def load_vqgan(directory: str | Path, device: str | torch.device | None = None) -> VQGAN:
    """The VQGAN of DIR/model.yaml + DIR/last.ckpt, loaded strictly and safely; eval mode, frozen, on `device`
    (default: CUDA when present, else CPU)."""
    cfg_path, ckpt_path = _files(Path(directory))
    config = load_config(cfg_path)
    model = VQGAN(config)
    load_state_strict(model, read_state_dict(ckpt_path), str(ckpt_path))
    model.eval().requires_grad_(False)
    return model.to(resolve_device(device))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" → CUDA when available, else CPU; an explicit device must exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu")
    return device


def save_taming_checkpoint(model: VQGAN, directory: str | Path, *, global_step: int = 0) -> Path:
    """Write DIR/model.yaml and DIR/last.ckpt in taming's layout (`{"state_dict": ..., "global_step": n}`), each
    atomically, so `load_vqgan(DIR)` (or taming itself) can read them."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_write_file(out / CKPT_FILE, lambda tmp: torch.save({"state_dict": state, "global_step": global_step},
                                                              tmp))
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(model.config.to_yaml_dict(), sort_keys=False))
    return out


__all__ = ["load_vqgan", "read_state_dict", "load_state_strict", "save_taming_checkpoint", "resolve_device",
           "CONFIG_FILE", "CKPT_FILE"]

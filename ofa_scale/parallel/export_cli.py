"""`ofa-convert export CANONICAL_DIR --out DIR`: a consolidated model directory from a checkpoint of any layout.

The input is a canonical checkpoint (ofa_scale.parallel.canonical: OFA-named slices written by every rank of
whatever tp/pp/dp/ZeRO layout, with an index); each tensor is assembled whole and copied into the model one at a
time, so the tool holds the model plus one tensor. The output is the `save_pretrained` format (`model.safetensors`
+ `config.json`) that `load_pretrained` and `model.pretrained` read. Optimizer moments are left behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ofa_scale.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a canonical checkpoint directory (holds index.json), or an ofa-train "
                                           "run directory or step directory (its canonical/ is read)")
    parser.add_argument("--out", required=True, help="directory to write model.safetensors and config.json into")
    parser.add_argument("--arch", help="OFA preset of the checkpoint, when index.json does not record the "
                                       "model config (then every size must match the preset)")


def export(checkpoint: str | Path, out: str | Path, arch: str | None = None) -> Path:
    import torch

    from ofa_scale.model import OFAModel, OFAConfig
    from ofa_scale.model.checkpoint import save_pretrained
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader
    from ofa_scale.utils.config import from_dict

    canonical = _canonical_input(checkpoint)
    from ofa_scale.finetune.prompt_checkpoint import has_prompt_checkpoint, load_prompt_model

    if has_prompt_checkpoint(canonical.parent):  # prompt tuning: the hash-checked base plus the tuned parameters
        return save_pretrained(load_prompt_model(canonical.parent), out, extra={"exported_from": str(checkpoint)})
    reader = CanonicalReader(canonical)
    weights, meta = reader.view(MODEL), reader.meta
    if meta.get("extra", {}).get("trained_only"):
        raise UserError(f"{checkpoint} holds only the parameters a prompt-tuning run trained; export the run's "
                        f"checkpoints/step_* directory, whose prompt/ folder names the base model")
    if meta.get("model"):
        cfg = from_dict(OFAConfig, meta["model"])
        cfg.validate()
    elif arch:
        cfg = OFAConfig.preset(arch)
    else:
        raise UserError(f"{checkpoint} does not record its model config; pass --arch with its OFA preset")
    with torch.device("meta"):
        model = OFAModel(cfg)
    model = model.to_empty(device="cpu")
    model.tie_embeddings()  # to_empty allocates per module, which unties the shared embedding
    model.reset_index_buffers()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()  # overwritten below when the checkpoint carries statistics
    expected = dict(model.named_parameters())
    missing = sorted(name for name in expected if name not in weights)
    if missing:
        raise UserError(f"{checkpoint} lacks {len(missing)} parameters of a {cfg.arch} model (e.g. {missing[0]}); "
                        f"pass the --arch it was trained with")
    with torch.no_grad():
        for name, p in expected.items():
            if weights.shape(name) != tuple(p.shape):
                raise UserError(f"{checkpoint}: {name} has shape {weights.shape(name)} but the model "
                                f"expects {tuple(p.shape)}; pass the --arch it was trained with")
            p.copy_(weights.read(name))
        for name, buf in model.named_buffers():
            if name in weights:  # BatchNorm statistics
                buf.copy_(weights.read(name).to(buf.dtype))
    return save_pretrained(model, out, extra={"exported_from": str(checkpoint),
                                              "optimizer_step": meta.get("optimizer_step")})


def _canonical_input(checkpoint: str | Path) -> Path:
    """The canonical/ directory to read: given directly, or found in a run / its checkpoints / a step directory."""
    from ofa_scale.training.layout_resume import canonical_dir
    from ofa_scale.training.run_dir import locate_run_checkpoint

    path = Path(checkpoint)
    located = locate_run_checkpoint(path)
    if located is not None:
        root, tag = located
        return canonical_dir(root / "checkpoints" / tag)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass an ofa-train run directory, one of its checkpoints/step_* "
                        "directories, or a checkpoint's canonical/ directory")
    return path


def run(args: argparse.Namespace) -> int:
    from ofa_scale.cli import require_empty_out

    require_empty_out(args.out)
    out = export(args.checkpoint, args.out, args.arch)
    print(f"wrote {out}")
    return 0

"""The layout-free copy of the EMA weights in a finetuning checkpoint: `<tag>/ema/`.

Same files and index as `<tag>/canonical/` (parallel/canonical_store.py), kind "model" only: every trainable
parameter's EMA, the frozen parameters as they are and the live BatchNorm statistics (what `EMA.swapped()` computes
with), under OFA names; for a prompt-tuning run (`trained_only`) the averaged parameters alone. `ofa-eval run`,
`model.pretrained` = a run directory and a resume under another layout read it; a resume under the same layout
restores the exact per-rank shadows from the rank files instead.

Writing is collective and never holds more than one full parameter per rank beyond the writer's buffer: each
parameter's ZeRO-3 partitions are all-gathered over its partition group (every data-parallel rank takes part) and
one of them, in turn, keeps it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ofa_scale.finetune.ema import EMA, _local
from ofa_scale.parallel import collectives
from ofa_scale.parallel.canonical import _read_slice, _slot, named_statistics
from ofa_scale.parallel.canonical_store import INDEX, MODEL, CanonicalReader, ShardWriter, entry, write_index
from ofa_scale.parallel.zero3_params import is_partitioned

EMA_DIR = "ema"
_WRAPPER = "model."  # GroupsForward holds the OFAModel as `.model`


def ofa_name(name: str) -> str:
    return name[len(_WRAPPER):] if name.startswith(_WRAPPER) else name


def has_ema_copy(tag_dir: Path) -> bool:
    return (Path(tag_dir) / EMA_DIR / INDEX).is_file()


@torch.no_grad()
def write_ema_copy(ctx, ema: EMA, tag_dir: Path, shapes: dict, step: int, trained_only: bool = False) -> None:
    """Collective: every rank calls it (module docstring). `trained_only` (prompt tuning): the averaged parameters
    alone, no frozen weight or statistic."""
    path = Path(tag_dir) / EMA_DIR
    rank = collectives.rank()
    writer = ShardWriter(path, rank)
    named = [(n, p) for n, p in ema.module.named_parameters() if not trained_only or n in ema.shadow]
    for i, (name, p) in enumerate(named):
        value = ema.shadow[name] if name in ema.shadow else _local(p).float()
        if is_partitioned(p):
            value = torch.cat(collectives.all_gather(value.contiguous(), p.ds_process_group))
            value = value[:p.ds_numel].view(p.ds_shape)
        if i % ctx.dp_size != ctx.dp_rank:  # data-parallel peers hold the same value; one of them writes it
            continue
        key = ofa_name(name)
        dim, offset, length = _slot(ctx, key, value.shape, shapes[key])
        writer.add(entry(MODEL, key), value if dim is None else value.narrow(dim, 0, length), shapes[key], dim,
                   offset)
    if ctx.dp_rank == 0 and ctx.tp_rank == 0 and not trained_only:  # statistics: replicated over tp ranks
        for name, buf in named_statistics(ema.module):
            writer.add(entry(MODEL, ofa_name(name)), buf, buf.shape)
    gathered = collectives.gather_object(writer.close(), 0)
    if rank == 0:
        write_index(path, gathered, {"optimizer_step": step, "layout": ctx.layout.to_dict(),
                                     "extra": {"kind": "ema", "decay": ema.decay, "updates": ema.updates},
                                     "model": None})


@torch.no_grad()
def load_ema_copy(ctx, ema: EMA, tag_dir: Path) -> None:
    """This rank's shadows from a checkpoint's EMA copy (a resume under another layout)."""
    view = CanonicalReader(Path(tag_dir) / EMA_DIR).view(MODEL)
    for name, p in ema.params.items():
        shape = p.ds_shape if is_partitioned(p) else p.shape
        value = _read_slice(ctx, view, ofa_name(name), shape).float()
        shadow = ema.shadow[name]
        if is_partitioned(p):
            size = shadow.numel()
            start = size * torch.distributed.get_rank(group=p.ds_process_group)
            flat = value.reshape(-1)
            n = max(0, min(size, flat.numel() - start))
            shadow.zero_()
            if n:
                shadow.narrow(0, 0, n).copy_(flat.narrow(0, start, n))
        else:
            shadow.copy_(value)


def ema_weights(tag_dir: Path):
    """The EMA copy's tensors by OFA name (a reader view: `load_model_weights` reads them one at a time)."""
    return CanonicalReader(Path(tag_dir) / EMA_DIR).view(MODEL)

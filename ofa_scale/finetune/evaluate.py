"""The evaluation driver of every finetuning task: shard records → items → predictions → metrics (+ files).

Used by the trainer's validation (finetune/trainer.py) and by `ofa-eval run` (finetune/eval_cli.py):

    result = evaluate(task, model, shard_dir, device=..., limit=0, final=False, lockstep=True)
    write_outputs(out_dir, task, result, label="caption_stage1_base")   # rank 0

Distribution: every rank reads the records once, in order (the loader in exact-epoch mode, one pass, one stream,
no shuffling); record i belongs to data-parallel rank i mod W, which builds its item (tensor-parallel peers share
a data-parallel rank and so the same items). Every rank runs the same number of batches — ranks with fewer items
repeat an item and drop its prediction — and, with `lockstep`, the same number of forward calls inside each batch
(generation keeps stepping finished ranks until all are done), because under ZeRO-3 and tensor parallelism every
forward is a collective. The predictions and the items (without their images) are gathered once on rank 0, which
scores them; the metrics are broadcast, so every rank returns them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ofa_scale.errors import UserError
from ofa_scale.finetune.task import EvalItem, FinetuneTask
from ofa_scale.parallel import collectives
from ofa_scale.parallel.tensor_parallel import full_vocabulary_logits

EVAL_FORMAT_VERSION = 1


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: int  # items evaluated (all ranks)
    seconds: float
    predictions: list[dict] = field(default_factory=list)  # rank 0: in record order; elsewhere empty
    items: list[EvalItem] = field(default_factory=list)  # rank 0: the predictions' items, images dropped


def read_records(task: FinetuneTask, shard_dir: str | Path) -> Iterator[dict]:
    """Every record of the task's source in `shard_dir`, once, in shard order."""
    from ofa_scale.data.loader import ShardLoader
    from ofa_scale.data.loader_config import LoaderConfig

    root = Path(shard_dir)
    if not (root / "manifest.json").is_file():
        raise UserError(f"{root} holds no manifest.json; point it at the output of "
                        f"`ofa-preprocess shards --format {task.source}`")
    loader = ShardLoader(LoaderConfig(root=str(root), composition={task.source: 1}, num_streams=1, seed=0,
                                      mode="epochs", epochs=1, shuffle_buffer=0, num_workers=0, on_corrupt="skip"))
    for batch in loader:
        yield from batch


def in_fraction(index: int, fraction: float) -> bool:
    """Whether record `index` is among an evenly spaced `fraction` of the records (every record at 1.0)."""
    return fraction >= 1.0 or math.floor((index + 1) * fraction) > math.floor(index * fraction)


def read_items(task: FinetuneTask, shard_dir: str | Path, *, limit: int = 0, dp_rank: int = 0, dp_size: int = 1,
               fraction: float = 1.0) -> tuple[list[tuple[int, EvalItem]], Optional[EvalItem]]:
    """([(record index, item)] of this data-parallel rank, a spare item for padding). `limit` > 0 reads only the
    first `limit` records; `fraction` < 1 keeps an evenly spaced share of those (`in_fraction`, task.valid_fraction).
    The spare is this rank's first item, or else the first item of the set, so a rank that owns no item can still
    run the batches the others run."""
    mine: list[tuple[int, EvalItem]] = []
    spare: Optional[EvalItem] = None
    kept = 0  # records taken so far: ranks share them round-robin (record i to rank i mod W at fraction 1)
    for index, record in enumerate(read_records(task, shard_dir)):
        if limit and index >= limit:
            break
        if not in_fraction(index, fraction):
            continue
        kept += 1
        if (kept - 1) % dp_size == dp_rank:
            item = task.eval_item(record)
            if item is not None:
                mine.append((index, item))
        elif spare is None and not mine:
            spare = task.eval_item(record)
    return mine, (mine[0][1] if mine else spare)


def _without_image(item: EvalItem) -> EvalItem:
    return dataclasses.replace(item, image=torch.empty(0, dtype=torch.uint8))


def lockstep_all_ranks(done: bool) -> bool:
    """The Lockstep of distributed evaluation: True once every rank is done (docs: finetune/task.py)."""
    return not collectives.any_rank(not done)


def evaluate(task: FinetuneTask, model: torch.nn.Module, shard_dir: str | Path, *, device: torch.device,
             dtype: torch.dtype = torch.float32, limit: int = 0, final: bool = False, dp_rank: int = 0,
             dp_size: int = 1, dp_group=None, lockstep: bool = False, batch_size: Optional[int] = None,
             items: Optional[tuple[list[tuple[int, EvalItem]], Optional[EvalItem]]] = None) -> EvalResult:
    """Collective over every rank (module docstring). `items`: this rank's share from `read_items`, when the
    caller keeps it between evaluations (the trainer validates many times on the same set)."""
    t0 = time.perf_counter()
    mine, spare = items if items is not None else read_items(task, shard_dir, limit=limit, dp_rank=dp_rank,
                                                             dp_size=dp_size)
    bs = batch_size or task.cfg.decoding.batch_size
    counts = collectives.all_gather_object(len(mine), dp_group)
    total = sum(counts)
    if total == 0:
        raise UserError(f"{shard_dir} gives no evaluation items for task {task.name} (every record was skipped); "
                        f"check that it holds `ofa-preprocess shards --format {task.source}` output with references")
    batches = math.ceil(max(counts) / bs)
    padded: list[tuple[Optional[int], EvalItem]] = list(mine) + [(None, spare)] * (batches * bs - len(mine))
    step = lockstep_all_ranks if lockstep else None
    was_training = model.training
    model.eval()
    produced: list[tuple[int, dict, EvalItem]] = []
    try:
        with torch.no_grad(), full_vocabulary_logits(model):
            for b in range(batches):
                chunk = padded[b * bs:(b + 1) * bs]
                predictions = task.predict(model, [it for _, it in chunk], device=device, dtype=dtype,
                                           lockstep=step)
                produced += [(i, p, _without_image(it)) for (i, it), p in zip(chunk, predictions) if i is not None]
    finally:
        model.train(was_training)
    gathered = collectives.gather_object(produced, 0, dp_group)
    metrics: Optional[dict[str, float]] = None
    result = EvalResult({}, total, 0.0)
    if collectives.rank() == 0:
        ordered = sorted((row for rank_rows in gathered for row in rank_rows), key=lambda row: row[0])
        result.predictions = [p for _, p, _ in ordered]
        result.items = [it for _, _, it in ordered]
        metrics = {k: float(v) for k, v in task.score(result.predictions, result.items, final=final).items()}
    result.metrics = collectives.broadcast_object(metrics, 0)
    result.seconds = time.perf_counter() - t0
    return result


# ---- files ----------------------------------------------------------------------------------------------------
def results_entries(task: FinetuneTask, predictions: list[dict]) -> list[dict]:
    """The public results.json entries; a caption result lists each image once (its first prediction), as
    COCO's evaluation tools require."""
    entries, seen = [], set()
    for p in predictions:
        entry = task.result_entry(p)
        if "image_id" in entry:
            if entry["image_id"] in seen:
                continue
            seen.add(entry["image_id"])
        entries.append(entry)
    return entries


def markdown_row(label: str, task: FinetuneTask, metrics: dict[str, float]) -> str:
    """`| label | m1 | m2 | … |` with the task's metrics in its order, in the README's percent scale (CIDEr
    1.382 → 138.20)."""
    cells = [f"{100 * metrics[m]:.2f}" if m in metrics else "-" for m in task.metrics]
    return "| " + " | ".join([label, *cells]) + " |"


def markdown_header(task: FinetuneTask) -> str:
    names = ["recipe", *task.metrics]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def write_outputs(out_dir: str | Path, task: FinetuneTask, result: EvalResult, *, label: str,
                  extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """DIR/results.json, DIR/metrics.json (the task's metric keys at the top level) and DIR/row.md (one
    markdown table row), plus the task's own files (image_gen: images/*.png, contact_sheet.png; listed under
    "artifacts"). Rank 0 only."""
    from ofa_scale.utils.io import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "metrics": out / "metrics.json", "row": out / "row.md"}
    # tasks whose predictions are files (image_gen's PNGs and contact sheet) write them first: results.json
    # lists their paths; the caller may log them (`artifacts`)
    write_artifacts = getattr(task, "write_artifacts", None)
    artifacts = write_artifacts(out, result.predictions, result.items) if write_artifacts else []
    if artifacts:
        paths["artifacts"] = artifacts
    atomic_write_json(paths["results"], results_entries(task, result.predictions))
    atomic_write_json(paths["metrics"], {"format_version": EVAL_FORMAT_VERSION, "task": task.name,
                                         **result.metrics, "samples": result.samples,
                                         "seconds": round(result.seconds, 3), **(extra or {})})
    atomic_write_text(paths["row"], markdown_row(label, task, result.metrics) + "\n")
    return paths


def summary_line(task: FinetuneTask, metrics: dict[str, float]) -> str:
    return ", ".join(f"{m} {metrics[m]:.4f}" for m in task.metrics if m in metrics)

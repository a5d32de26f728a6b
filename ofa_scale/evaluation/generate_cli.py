"""`ofa-eval generate`: load a checkpoint, generate on held-out `vl` shard records, score, write results.

DIR/<task>/{predictions,references}.jsonl (re-scorable with `ofa-eval score`), DIR/<task>/results.parquet and
eval.json per task, and DIR/eval.json with every task's metrics. Heavy imports (torch, the model) happen in run().
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ofa_scale.errors import UserError

DEFAULT_TASKS = "caption,vqa,grounding"
SUMMARY_KIND = "ofa-scale evaluation summary"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ofa_scale.data.tokenizer import KINDS as TOKENIZER_KINDS
    from ofa_scale.evaluation.score import add_score_options

    parser.add_argument("--checkpoint", required=True, metavar="DIR_OR_RUN",
                        help="ofa-train run dir (or its checkpoints/step_* dir), ofa-scale model dir, or OFA .pt")
    parser.add_argument("--data", required=True, metavar="SHARDS_ROOT",
                        help="`ofa-preprocess shards` output holding held-out vl records")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated subset of {DEFAULT_TASKS}")
    parser.add_argument("--limit", type=int, default=50, help="samples per task (first ones in shard order)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per generation batch")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    # default None, not gpt2-bpe: a model dir records its kind (OFA-CN imports: bert), which load_eval_model reads
    parser.add_argument("--tokenizer-kind", choices=TOKENIZER_KINDS, default=None,
                        help="tokenizer kind for model dirs / .pt files (default: the kind the model dir recorded, "
                             "else gpt2-bpe; run dirs name their own)")
    parser.add_argument("--tokenizer-path", default=None,
                        help="tokenizer directory for model dirs / .pt files (run dirs name their own)")
    parser.add_argument("--image-size", type=int, default=None, help="caption/VQA input size (default: the run's "
                                                                     "vl.image_size, else 480)")
    parser.add_argument("--grounding-image-size", type=int, default=None,
                        help="grounding input size (default: the run's vl.image_size, else 512)")
    parser.add_argument("--beam", type=int, default=None,
                        help="beam size for every task (default: each task's OFA setting, e.g. 5 for captions); "
                             "1 = greedy, useful for small undertrained models whose beams prefer short answers")
    parser.add_argument("--answers", "--vqa-answers", dest="answers", default=None, metavar="FILE",
                        help="VQA candidate answers, one per line (`ofa-preprocess vqa-answers` from the training "
                             "TSV, OFA's trainval_ans2label): the only answers VQA decoding may produce; required "
                             "when vqa is among --tasks")
    add_score_options(parser)


def _tasks(spec: str) -> list[str]:
    from ofa_scale.evaluation.vl_inputs import GENERATION_TASKS

    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in GENERATION_TASKS]
    if unknown or not tasks:
        raise UserError(f"--tasks {spec!r}: choose a comma-separated subset of {', '.join(GENERATION_TASKS)}")
    return list(dict.fromkeys(tasks))


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from ofa_scale.utils.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _read_answers(path: str | None, tasks: list[str]) -> list[str]:
    """The VQA candidates. Never the evaluated questions' own references: a trie over them leaks the labels."""
    if "vqa" not in tasks:
        return []
    if path is None:
        raise UserError("VQA evaluation decodes over a candidate answer file: give --answers FILE (one answer per "
                        "line, as `ofa-preprocess vqa-answers --input vqa_train.tsv --out FILE` writes) or leave "
                        "vqa out of --tasks")
    from ofa_scale.finetune.answers import load_answers

    return load_answers(path)


def _evaluate_task(task, samples, loaded, args, options, answers, device, task_dir: Path) -> dict:
    """Generate, write predictions/references, score; returns the task's eval document."""
    from ofa_scale.evaluation.generation import predict
    from ofa_scale.evaluation.records import pair_records
    from ofa_scale.evaluation.score import score_and_write
    from ofa_scale.evaluation.tasks import task_spec

    t0 = time.perf_counter()
    predictions = predict(loaded.model, samples, loaded.tokenizer, loaded.geometry, batch_size=args.batch_size,
                          device=device, answers=answers, beam_size=args.beam)
    seconds = time.perf_counter() - t0
    print(f"ofa-eval: {task}: generated {len(predictions)} in {seconds:.1f}s "
          f"({len(predictions) / max(seconds, 1e-9):.1f} samples/s)", flush=True)
    references = [s.reference for s in samples]
    _write_jsonl(task_dir / "predictions.jsonl", predictions)
    _write_jsonl(task_dir / "references.jsonl", references)
    paired = pair_records(task_spec(task), predictions, references)
    return score_and_write(task, paired, options, task_dir, {
        "checkpoint": loaded.description, "data": str(Path(args.data).resolve()),
        "generation_seconds": round(seconds, 3),
        "samples_per_second": round(len(predictions) / max(seconds, 1e-9), 3),
        "input_geometry": vars(loaded.geometry).copy()})


def run(args: argparse.Namespace) -> int:
    import torch

    from ofa_scale.evaluation.model_source import load_eval_model
    from ofa_scale.evaluation.results import EVAL_FORMAT_VERSION, summary_text
    from ofa_scale.evaluation.score import options_from_args
    from ofa_scale.evaluation.vl_inputs import collect_samples, read_vl_records
    from ofa_scale.utils.io import atomic_write_json

    tasks = _tasks(args.tasks)
    if args.limit < 1 or args.batch_size < 1:
        raise UserError("--limit and --batch-size must be at least 1")
    if not (Path(args.data) / "manifest.json").is_file():
        raise UserError(f"--data {args.data} holds no manifest.json; point it at an `ofa-preprocess shards` output "
                        "converted from held-out vision-language TSVs")
    options = options_from_args(args)
    answers = _read_answers(args.answers, tasks)
    t0 = time.perf_counter()
    loaded = load_eval_model(args.checkpoint, tokenizer_kind=args.tokenizer_kind, tokenizer_path=args.tokenizer_path)
    geometry = loaded.geometry
    for name, value in (("image_size", args.image_size), ("grounding_image_size", args.grounding_image_size)):
        if value is not None:
            if value < 16 or value % 16:
                raise UserError(f"--{name.replace('_', '-')} {value}: use a positive multiple of 16")
            setattr(geometry, name, value)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded.model = loaded.model.to(device).eval()
    samples = collect_samples(read_vl_records(args.data), tasks, args.limit, loaded.tokenizer, geometry)
    if not any(samples.values()):
        raise UserError(f"--data {args.data} has no vl records of type caption, qa or visual_grounding; point it "
                        "at shards converted from held-out vision_language TSVs")
    out = Path(args.out)
    documents, summary = [], {}
    for task in tasks:
        if not samples[task]:
            print(f"ofa-eval: no {task} records in {args.data}; skipped")
            continue
        document = _evaluate_task(task, samples[task], loaded, args, options, answers, device, out / task)
        documents.append(document)
        summary[task] = {k: document[k] for k in ("main_metric", "metrics", "counts")}
    atomic_write_json(out / "eval.json", {
        "format_version": EVAL_FORMAT_VERSION, "kind": SUMMARY_KIND, "checkpoint": loaded.description,
        "data": str(Path(args.data).resolve()), "limit": args.limit, "device": str(device),
        "seconds": round(time.perf_counter() - t0, 3), "tasks": summary})
    print(f"ofa-eval: evaluated {loaded.description.get('checkpoint')} on "
          f"{sum(d['counts']['samples'] for d in documents)} samples in {time.perf_counter() - t0:.1f}s")
    print(summary_text(documents, out))
    return 0

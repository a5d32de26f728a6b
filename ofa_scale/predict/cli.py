"""`ofa-predict`: run a trained model over many inputs and write one JSONL line per input.

    ofa-predict --model RUN_OR_MODEL --task caption --input images/ --out captions.jsonl
    ofa-predict --model ofa_base.pt --tokenizer-path bpe/ --task vqa --input questions.jsonl --out answers.jsonl \\
        [--answers answers.txt]
    ofa-predict --model RUN --task grounding --input refcoco_val.tsv --out boxes.jsonl --draw-boxes drawn/
    ofa-predict --model RUN --task image_gen --vqgan vqgan/ --input captions.txt --out gen.jsonl [--samples 24] \\
        [--clip ViT-B-16.pt]

Output lines, in input order: {"id", <field>} with caption `caption`, vqa `answer`, grounding `box` ([x0, y0, x1,
y1] in the original image's pixels), snli_ve `label` (yes / no / maybe), instruct `text`, image_gen `images`
(PNG paths in <OUT>_images/ beside OUT, best first, with their `logprobs` and, with --clip, `clip_scores`; plus
<OUT>_contact_sheet.png); a failed input gets {"id", "error"}
and the run goes on. Exit status: 0 when every input got a prediction, 1 when any failed, 2 for a
usage error (nothing run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ofa_scale.cli import run_cli
from ofa_scale.errors import UserError
from ofa_scale.predict.image_gen import add_clip_options
from ofa_scale.predict.inputs import PredictInput, open_image, read_inputs
from ofa_scale.predict.tasks import IMAGE_GEN, TASK_CHOICES, Predictor, get_spec, task_section
from ofa_scale.utils.config import load_yaml

PROGRESS_EVERY_S = 2.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ofa-predict", description=__doc__.splitlines()[0],
        epilog="Inputs: a folder of images (id = file name), a TSV in the task's format (id = the row's id), or "
               "a JSONL of {\"id\"?, \"image\": path relative to the file, \"text\"?} (vqa: \"objects\"?; snli_ve: "
               "\"premise\"?). Prompts and decoding are the finetuning recipe's (configs/finetune), or the run's "
               "own task section when the model was finetuned on the task.")
    p.add_argument("--model", required=True, metavar="M",
                   help="ofa-train run dir (its best checkpoint, EMA weights when stored), a checkpoints/step_* dir, "
                        "an ofa-scale model dir or a released OFA .pt")
    p.add_argument("--task", required=True, choices=TASK_CHOICES,
                   help="classify is not available yet")
    p.add_argument("--input", required=True, metavar="PATH", help="folder of images, .tsv or .jsonl")
    p.add_argument("--out", required=True, metavar="OUT.jsonl")
    p.add_argument("--tokenizer-path", default=None, metavar="DIR",
                   help="the BPE directory; needed for a model dir or .pt (a run dir carries its own)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="inputs per forward (default 16)")
    p.add_argument("--device", default=None, metavar="D",
                   help="torch device (default: cuda when present, else cpu); bf16 on GPUs that support it")
    p.add_argument("--text", default="", help="the text of inputs that carry none (e.g. one question for a "
                                              "folder of images)")
    p.add_argument("--answers", default=None, metavar="FILE",
                   help="vqa: candidate answers, one per line; the answer is the best-scoring candidate (the "
                        "recipe's inference). Without it VQA decodes open-ended by unconstrained beam search")
    p.add_argument("--draw-boxes", default=None, metavar="DIR",
                   help="grounding: also write DIR/<id>.png, the image with the predicted box drawn")
    p.add_argument("--recipe", default=None, metavar="YAML",
                   help="take the task section (prompts, image size, decoding) from this finetuning recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task-section value, e.g. --set decoding.beam=1 --set image_size=384")
    p.add_argument("--no-ema", action="store_true", help="a run's live weights instead of its EMA weights")
    p.add_argument("--base-model", default=None, metavar="PATH",
                   help="a prompt-tuned run whose base model moved: an identical copy of that base (same SHA-256)")
    p.add_argument("--vqgan", default=None, metavar="DIR",
                   help="image_gen: the taming VQGAN (model.yaml + last.ckpt) that turns codes into pixels")
    p.add_argument("--samples", type=int, default=24, metavar="N",
                   help="image_gen: images per caption (default 24, OFA's), best first: by CLIP similarity with "
                        "--clip, else by the model's own sequence log-probability")
    add_clip_options(p, "image_gen: ")
    p.add_argument("--seed", type=int, default=42, metavar="S",
                   help="image_gen: caption i (0-based) samples with seed S+i, so its images are reproducible")
    p.add_argument("--early-exit", default=None, metavar="THRESH",
                   help="MuE early exit: one cosine threshold (e.g. 0.95) or img=0.99,txt=0.7,decoder=0.9 (MuE's "
                        "img_thres/txt_thres/decoder_thres; img/txt apart need a model.mue model; encoder= sets "
                        "both); default: the task section's early_exit (--recipe's, or the run's own); 'off' = "
                        "the full model; the summary line says how many layers ran")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), "ofa-predict")


def run(args: argparse.Namespace) -> int:
    from ofa_scale.model import early_exit

    if args.task == IMAGE_GEN:  # text in, images out: none of the image tasks' machinery applies
        from ofa_scale.predict.image_gen import run_image_gen
        return run_image_gen(args)
    if args.vqgan or args.clip:
        raise UserError("--vqgan and --clip are image_gen options; use them with --task image_gen")
    spec = get_spec(args.task)
    # --early-exit: MuE exits (model/early_exit.py; the config also counts the layers run), refused here when
    # malformed, before the model loads; without the flag the task section's early_exit decides below
    exits = early_exit.resolve(args.early_exit, None)
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.draw_boxes and spec.name != "grounding":
        raise UserError("--draw-boxes draws grounding boxes; use it with --task grounding")
    if args.answers and spec.name != "vqa":
        raise UserError("--answers is the VQA candidate file; use it with --task vqa")
    if args.answers and not Path(args.answers).is_file():
        raise UserError(f"--answers {args.answers} does not exist")
    inputs = read_inputs(args.input, tsv_format=spec.tsv_format, default_text=args.text)
    first = next(inputs, None)  # a bad --input is refused before the model loads
    if first is None:
        raise UserError(f"--input {args.input} holds no inputs")
    device, dtype = pick_device(args.device)
    loaded = load_model(args.model, args.tokenizer_path, ema=not args.no_ema, base=args.base_model)
    section = task_section(spec, run_task=run_task_section(loaded.description), recipe=args.recipe,
                           answers=args.answers, overrides=args.overrides, batch_size=args.batch_size,
                           tokenizer=loaded.tokenizer)
    if args.early_exit is None:  # the recipe's (or the run's own) task.early_exit, as `ofa-eval run` does
        exits = early_exit.resolve(None, section.early_exit)
    predictor = Predictor(spec, section, loaded.tokenizer)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    if args.recipe:  # a MuE recipe runs the model with its decomposed encoder, as `ofa-eval run` does
        early_exit.use_recipe_encoder(model, (load_yaml(args.recipe).get("model") or {}).get("overrides") or {})
    early_exit.enable(model, exits)  # None: the full model
    draw_dir = Path(args.draw_boxes) if args.draw_boxes else None
    if draw_dir is not None:
        draw_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"ofa-predict: {spec.name} with {loaded.description.get('checkpoint')} on {device} "
          f"({str(dtype).removeprefix('torch.')}), batch {args.batch_size}", file=sys.stderr)

    done = failed = 0
    start = last = time.perf_counter()
    with out.open("w", encoding="utf-8") as f:
        for chunk in _batches(itertools.chain([first], inputs), args.batch_size):
            for line in predict_batch(predictor, model, chunk, device=device, dtype=dtype, draw_dir=draw_dir):
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                failed += "error" in line
            f.flush()
            done += len(chunk)
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                print(f"ofa-predict: {done} inputs, {failed} failed, {done / (now - start):.2f} items/s",
                      file=sys.stderr)
    seconds = time.perf_counter() - start
    print(f"ofa-predict: {done} inputs ({failed} failed) in {seconds:.1f}s, {done / max(seconds, 1e-9):.2f} "
          f"items/s; wrote {out}", file=sys.stderr)
    if exits is not None:
        print(f"ofa-predict: early exit {exits.describe()}: layers run {exits.stats.summary()}", file=sys.stderr)
    return 1 if failed else 0


def pick_device(name: Optional[str]):
    """(device, dtype) of `--device`: cuda when present else cpu by default; bf16 on GPUs that support it."""
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for a GPU but torch sees none; use --device cpu")
    return device, torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_model(model: str, tokenizer_path: Optional[str], *, ema: bool = True, base: Optional[str] = None):
    """The EvalModel of M: a run (or a checkpoint of one) through finetune/weights.py — best checkpoint, EMA
    weights when stored, `base` for a prompt-tuned run whose base moved — else a model dir / .pt with
    --tokenizer-path."""
    from ofa_scale.evaluation.model_source import load_eval_model
    from ofa_scale.finetune.weights import load_run_eval_model, run_checkpoint

    if not Path(model).exists():
        raise UserError(f"--model {model} does not exist; pass an ofa-train run dir, a model dir or an OFA .pt")
    if run_checkpoint(model) is not None:
        return load_run_eval_model(model, ema=ema, base=base, base_hint="--base-model PATH")
    return load_eval_model(model, tokenizer_path=tokenizer_path)


def run_task_section(description: dict) -> Optional[dict]:
    """The `task:` section of the run the model comes from (None for a model dir / .pt or a pretraining run)."""
    if "run" not in description:
        return None
    return load_yaml(Path(description["run"]) / "config.yaml").get("task") or None


def _batches(items: Iterable[PredictInput], size: int) -> Iterator[list[PredictInput]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def predict_batch(predictor: Predictor, model: Any, chunk: list[PredictInput], *, device, dtype,
                  draw_dir: Optional[Path] = None) -> list[dict]:
    """The output lines of one batch, in order: failed inputs get their error, the others one prediction."""
    lines: list[dict] = [{"id": x.id} for x in chunk]
    ready = []  # (position, item, image)
    for i, x in enumerate(chunk):
        if x.error:
            lines[i]["error"] = x.error
            continue
        try:
            image = open_image(x.image)
            ready.append((i, predictor.item(x.id, image, x.text, x.meta), image))
        except UserError as e:
            lines[i]["error"] = str(e)
    if not ready:
        return lines
    items = [r[1] for r in ready]
    try:
        predictions = predictor.task.predict(model, items, device=device, dtype=dtype)
    except Exception:  # noqa: BLE001 - one input may break the batch: retry one by one to find it
        predictions = [_predict_one(predictor, model, item, device, dtype) for item in items]
    for (i, _, image), pred in zip(ready, predictions):
        if "error" in pred:
            lines[i]["error"] = pred["error"]
            continue
        lines[i][predictor.spec.field] = predictor.output(pred)
        if draw_dir is not None:
            lines[i]["drawn"] = str(draw_box(image, lines[i]["box"], draw_dir / f"{safe_name(chunk[i].id)}.png"))
    return lines


def _predict_one(predictor: Predictor, model: Any, item, device, dtype) -> dict:
    try:
        return predictor.task.predict(model, [item], device=device, dtype=dtype)[0]
    except Exception as e:  # noqa: BLE001 - reported on the input's line; the run goes on
        return {"id": item.id, "error": f"prediction failed: {type(e).__name__}: {e}"}


def safe_name(item_id: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(item_id)) or "_"


def draw_box(image, box: list[float], path: Path) -> Path:
    from PIL import ImageDraw

    drawn = image.copy()
    width = max(2, round(min(drawn.size) / 150))
    x0, x1 = sorted((box[0], box[2]))  # an untrained model may emit the corners swapped
    y0, y1 = sorted((box[1], box[3]))
    ImageDraw.Draw(drawn).rectangle([x0, y0, x1, y1], outline=(255, 0, 0), width=width)
    drawn.save(path, format="PNG")
    return path


if __name__ == "__main__":
    sys.exit(main())

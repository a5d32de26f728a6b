"""`ofa-predict` throughput: items/s for caption and VQA with an ofa_tiny-sized model (random weights: the speed
does not depend on them), end to end per batch as the CLI runs it (image files opened and resized, prompts built
by the task modules, the recipe's decoding preset), batch 1 vs larger batches side by side.

    python benchmarks/predict_throughput.py          # CPU, 1 thread, recipe geometry (480 px), batches 1 and 8
    python benchmarks/predict_throughput.py --device cuda --batch-sizes 1,16,64 --images 128

Tasks: caption (caption_stage1_base: beam 5, ≤16 tokens, no repeated trigram), vqa open-ended (no --answers:
unconstrained beam 5 after the forced question prompt, ≤30 answer tokens) and, with --candidates N, vqa with N
synthetic candidate answers (the recipe's all-candidate scoring). Random weights decode to maximum length, the
worst case for beam search. Timing: the median over --repeats runs of all --images inputs, after one warm-up batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.predict.cli import predict_batch
from ofa_scale.predict.inputs import PredictInput
from ofa_scale.predict.tasks import SPECS, Predictor, task_section

DEFAULT_BPE = Path(__file__).resolve().parents[2] / "shared" / "ofa-bpe"


def make_images(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        img = Image.new("RGB", (640, 480), (37 * i % 256, 90, 200))
        img.paste((200, 40, 40), (100 + i, 80, 300, 260))
        paths.append(root / f"img{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def time_task(predictor: Predictor, model, inputs: list[PredictInput], batch: int, repeats: int, device,
              dtype) -> float:
    """Median items/s over `repeats` passes of `inputs` in batches of `batch`."""
    predict_batch(predictor, model, inputs[:batch], device=device, dtype=dtype)  # warm-up
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(inputs), batch):
            lines = predict_batch(predictor, model, inputs[i:i + batch], device=device, dtype=dtype)
            assert not any("error" in line for line in lines), lines
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(inputs) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ofa_tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=0, help="override the recipes' 480 px (0: keep)")
    p.add_argument("--candidates", type=int, default=0, help="also time VQA all-candidate scoring over N answers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared, loaded machine 2 threads ran 40x slower)")
    p.add_argument("--bpe", default=str(DEFAULT_BPE))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tok = load_tokenizer("gpt2-bpe", args.bpe)
    torch.manual_seed(0)
    model = OFAModel(OFAConfig.preset(args.arch, vocab_size=len(tok))).eval().to(device=device, dtype=dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    overrides = [f"image_size={args.image_size}"] if args.image_size else []

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images)
        runs = [("caption", "caption", None, ""), ("vqa (open beam)", "vqa", None, "what color is the square?")]
        if args.candidates:
            answers = Path(tmp) / "answers.txt"
            answers.write_text("".join(f"answer {i}\n" for i in range(args.candidates)))
            runs.append((f"vqa ({args.candidates} candidates)", "vqa", str(answers), "what color is the square?"))
        print(f"# ofa-predict throughput: {args.arch} (random weights), {device} {str(dtype).removeprefix('torch.')}, "
              f"{args.threads} threads, {args.images} images 640x480, median of {args.repeats}")
        print("| task | " + " | ".join(f"batch {b} items/s" for b in batches) + f" | batch {batches[-1]} / batch "
              f"{batches[0]} |")
        print("|---" * (len(batches) + 2) + "|")
        for label, name, answers, text in runs:
            rates = []
            for b in batches:
                section = task_section(SPECS[name], run_task=None, recipe=None, answers=answers,
                                       overrides=overrides, batch_size=b)
                predictor = Predictor(SPECS[name], section, tok)
                inputs = [PredictInput(id=q.name, image=q, text=text) for q in paths]
                rates.append(time_task(predictor, model, inputs, b, args.repeats, device, dtype))
            print(f"| {label} | " + " | ".join(f"{r:.2f}" for r in rates) + f" | {rates[-1] / rates[0]:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

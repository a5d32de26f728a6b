"""`ofa-predict --task image_gen`: text → 1024 VQGAN codes → PNG images (spec §7.6, extensions §10.5.5).

Each caption becomes OFA's source ` what is the complete image? caption: {caption}` (pre_caption, 64 words, bos/eos)
with a text-only encoder and the decoder in code mode. `samples` images per caption are drawn by top-k 256 sampling
of exactly 1024 code tokens: the ids allowed are the tokenizer's `<code_i>` range (not fixed GPT-2 numbers; OFA-CN's
dictionary puts the codes elsewhere), cut to the codes the VQGAN has; eos is banned until the 1024th token and then
forced. Codes → 32×32 grid → VQGAN decoder → 256×256 PNGs.

Ranking: with `--clip WEIGHTS` (the user's local CLIP ViT-B/16 file, evaluation/clip_model.py) the samples are
reranked by CLIP text–image cosine similarity against the caption as OFA's CLIP sees it (extensions §10.6.2), best
first. Without CLIP weights they are ordered by the model's own sequence log-probability of their 1024 codes. Each
line carries both scores in its images' order. Every run also writes a contact sheet: one row per caption (the first
64), its best 8 images.

Reproducibility: caption number i (0-based, in input order) samples with a generator seeded `seed + i`, so its
images do not depend on what else is in the input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from ofa_scale.errors import UserError
from ofa_scale.objectives.text import pre_caption

PROMPT = " what is the complete image? caption: {}"
MAX_CAPTION_WORDS = 64  # OFA's max_src_length for image_gen
NUM_CODES = 1024        # a 32×32 grid: code_image_size 256 / 8
GRID = 32
TOPK = 256


@dataclass
class Sample:
    codes: torch.Tensor  # (1024,) VQGAN indices (token id − the tokenizer's code offset)
    logprob: float       # the model's log-probability of the 1024 code tokens
    clip: Optional[float] = None  # CLIP cosine similarity of its image with the caption (when ranked by CLIP)


class ImageGenerator:
    """An OFA model + its tokenizer + a VQGAN (+ optionally a CLIP `ClipScorer` that ranks): captions → ranked
    samples → images."""

    def __init__(self, model: Any, tokenizer: Any, vqgan: Any, *, samples: int, device, topk: int = TOPK,
                 clip: Any = None):
        from ofa_scale.model.generate import GenerationConfig, max_generation_len

        if samples < 1:
            raise UserError("--samples must be >= 1")
        grid = getattr(model.config, "code_grid_size", None)
        if grid != GRID:
            raise UserError(f"the model's decoder code grid is {grid}x{grid} (model.code_image_size "
                            f"{getattr(model.config, 'code_image_size', '?')}); text-to-image needs a 32x32 grid "
                            "(code_image_size 256), as OFA's image_gen checkpoints have")
        num_codes = min(int(getattr(tokenizer, "num_codes", 0)), int(vqgan.n_embed))
        if num_codes < 1:
            raise UserError("the tokenizer has no <code_i> tokens; text-to-image needs OFA's code vocabulary")
        self.model, self.tok, self.vqgan, self.device, self.clip = model, tokenizer, vqgan, device, clip
        self.code_offset = int(tokenizer.code_offset)
        # only codes both the tokenizer and the VQGAN know (a smaller codebook than 8192 cuts the range)
        self.cfg = GenerationConfig.for_task("image_gen", beam_size=samples, sampling_topk=topk,
                                             constraint_range=(self.code_offset, self.code_offset + num_codes))
        if max_generation_len(model, self.cfg, 1, True) < NUM_CODES:
            raise UserError(f"the model decodes at most {max_generation_len(model, self.cfg, 1, True)} tokens "
                            f"(max_target_positions {model.config.max_target_positions}); text-to-image needs "
                            f"{NUM_CODES}")

    def source(self, caption: str) -> list[int]:
        text = pre_caption(caption, MAX_CAPTION_WORDS)
        if not text:
            raise UserError("empty caption")
        return [self.tok.bos, *self.tok.encode(PROMPT.format(text)), self.tok.eos]

    @torch.no_grad()
    def sample(self, caption: str, seed: int) -> list[Sample]:
        """The caption's samples, best (highest log-probability) first; UserError for an unusable caption."""
        from ofa_scale.model.generate import generate

        src = torch.tensor([self.source(caption)], dtype=torch.long, device=self.device)
        batch = {"src_tokens": src, "code_masks": torch.ones(1, dtype=torch.bool, device=self.device)}
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        hyps = generate(self.model, batch, self.cfg, generator=gen)[0]
        out = []
        for h in hyps:
            codes = h.tokens[:NUM_CODES]
            # the config guarantees this; a violation is a bug in generation, not a user error
            assert h.tokens.numel() == NUM_CODES + 1 and h.tokens[-1] == self.tok.eos, h.tokens.numel()
            out.append(Sample(codes - self.code_offset, float(h.positional_scores[:NUM_CODES].sum())))
        return sorted(out, key=lambda s: -s.logprob)

    def render(self, samples: list[Sample]) -> torch.Tensor:
        """uint8 (N, 256, 256, 3) images of the samples (codes in raster order on a 32×32 grid)."""
        return self.vqgan.decode(torch.stack([s.codes for s in samples]).view(-1, GRID, GRID))

    @property
    def ranking(self) -> str:
        return "CLIP similarity" if self.clip is not None else "log-probability"

    def generate(self, caption: str, seed: int) -> tuple[list[Sample], list[Any]]:
        """The caption's samples and their PIL images, best first: by CLIP similarity when a scorer is set (OFA's
        ranking; `Sample.clip` filled), else by the model's log-probability."""
        from ofa_scale.evaluation.clip_model import clip_text, order_by
        from ofa_scale.vqgan import to_pil

        samples = self.sample(caption, seed)
        images = to_pil(self.render(samples))
        if self.clip is None:
            return samples, images
        scores = self.clip.similarities(images, clip_text(caption, MAX_CAPTION_WORDS))
        order = order_by(scores)
        return [replace(samples[i], clip=float(scores[i])) for i in order], [images[i] for i in order]

    def labels(self, samples: list[Sample]) -> list[str]:
        """A short score label per sample, for the contact sheet and the demo."""
        return [f"clip {s.clip:.3f}" if s.clip is not None else f"logp {s.logprob:.1f}" for s in samples]


def run_image_gen(args: argparse.Namespace) -> int:
    """`ofa-predict --task image_gen`: one line {"id", "images", "logprobs"[, "clip_scores"]} per caption (lists
    best first), or {"id", "error"}; the PNGs in <OUT>_images/ and a contact sheet <OUT>_contact_sheet.png."""
    from ofa_scale.evaluation.contact_sheet import RankedSheet, write_ranked_pngs
    from ofa_scale.predict.cli import load_model, pick_device
    from ofa_scale.predict.inputs import read_captions
    from ofa_scale.vqgan import load_vqgan

    if args.early_exit is not None or args.draw_boxes or args.answers:
        raise UserError("--early-exit, --draw-boxes and --answers do not apply to --task image_gen")
    if not args.vqgan:
        raise UserError("--task image_gen needs --vqgan DIR (a taming VQGAN: model.yaml + last.ckpt)")
    captions = read_captions(args.input, default_text=args.text)
    first = next(captions, None)
    if first is None:
        raise UserError(f"--input {args.input} holds no captions")
    device, dtype = pick_device(args.device)
    clip = load_clip(args.clip, args.clip_arch, device)  # a bad CLIP file stops the run before the big loads
    vqgan = load_vqgan(args.vqgan, device=device)
    loaded = load_model(args.model, args.tokenizer_path, ema=not args.no_ema, base=args.base_model)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    generator = ImageGenerator(model, loaded.tokenizer, vqgan, samples=args.samples, device=device, clip=clip)
    out = Path(args.out)
    image_dir = out.parent / f"{out.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    sheet_path = out.parent / f"{out.stem}_contact_sheet.png"
    sheet = RankedSheet()
    print(f"ofa-predict: image_gen with {loaded.description.get('checkpoint')} on {device} "
          f"({str(dtype).removeprefix('torch.')}), {args.samples} samples per caption, seed {args.seed}; "
          f"samples ranked by {generator.ranking}" + ("" if clip else " (no --clip weights)"), file=sys.stderr)
    done = failed = 0
    start = time.perf_counter()
    with out.open("w", encoding="utf-8") as f:
        for number, item in enumerate(itertools.chain([first], captions)):
            line: dict[str, Any] = {"id": item.id}
            try:
                if item.error:
                    raise UserError(item.error)
                samples, images = generator.generate(item.text, args.seed + number)
                paths = write_ranked_pngs(images, image_dir, item.id)
                line.update(images=[str(p) for p in paths], logprobs=[round(s.logprob, 4) for s in samples])
                if clip is not None:
                    line["clip_scores"] = [round(s.clip, 6) for s in samples]
                sheet.add(item.text, images, generator.labels(samples))
            except UserError as e:
                line["error"] = str(e)
            failed += "error" in line
            done += 1
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            print(f"ofa-predict: {done} captions, {failed} failed, "
                  f"{done / (time.perf_counter() - start):.3f} captions/s", file=sys.stderr)
    wrote = f"{out}, {image_dir}/"
    if sheet.rows:
        wrote += f" and {sheet.write(sheet_path)}"
    print(f"ofa-predict: {done} captions ({failed} failed) in {time.perf_counter() - start:.1f}s; wrote {wrote}",
          file=sys.stderr)
    return 1 if failed else 0


def add_clip_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    """`--clip WEIGHTS` and `--clip-arch ARCH`, shared by ofa-predict and ofa-demo (`prefix` starts their help)."""
    parser.add_argument("--clip", default=None, metavar="WEIGHTS",
                        help=f"{prefix}rank the samples by CLIP text-image similarity, as OFA does, with this local "
                             "CLIP file (OpenAI's ViT-B-16.pt as OFA ships it, or an open_clip state dict)")
    parser.add_argument("--clip-arch", default="ViT-B-16", metavar="ARCH",
                        help=f"{prefix}the open_clip architecture of --clip (default %(default)s, OFA's; "
                             "ViT-B-16-quickgelu for OpenAI weights saved as a state dict), or a model-config .json")


def load_clip(weights: Optional[str], arch: str, device) -> Any:
    """The `ClipScorer` of `--clip WEIGHTS` (None without weights: log-probability ranking)."""
    if not weights:
        return None
    from ofa_scale.evaluation.clip_model import ClipScorer

    return ClipScorer.load(weights, arch, device=device)


__all__ = ["ImageGenerator", "Sample", "run_image_gen", "add_clip_options", "load_clip", "PROMPT", "NUM_CODES"]

"""`ofa-predict --task image_gen`: text → 1024 VQGAN codes → PNG images (spec §7.6, extensions §10.5.5).

Each caption becomes OFA's source ` what is the complete image? caption: {caption}` (pre_caption, 64 words, bos/eos)
with a text-only encoder and the decoder in code mode. `samples` images per caption are drawn by top-k 256 sampling
of exactly 1024 code tokens: the ids allowed are the tokenizer's `<code_i>` range (not fixed GPT-2 numbers; OFA-CN's
dictionary puts the codes elsewhere), cut to the codes the VQGAN has; eos is banned until the 1024th token and then
forced. Codes → 32×32 grid → VQGAN decoder → 256×256 PNGs.

Ranking: OFA reranks the samples by CLIP text–image similarity. CLIP is not wired in yet, so the samples are ordered
by the model's own sequence log-probability of their 1024 codes (best first); each line carries those scores.

Reproducibility: caption number i (0-based, in input order) samples with a generator seeded `seed + i`, so its
images do not depend on what else is in the input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class ImageGenerator:
    """An OFA model + its tokenizer + a VQGAN: captions → ranked samples → uint8 images."""

    def __init__(self, model: Any, tokenizer: Any, vqgan: Any, *, samples: int, device, topk: int = TOPK):
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
        self.model, self.tok, self.vqgan, self.device = model, tokenizer, vqgan, device
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


def run_image_gen(args: argparse.Namespace) -> int:
    """`ofa-predict --task image_gen`: one line {"id", "images", "logprobs"} per caption, or {"id", "error"}."""
    from ofa_scale.predict.cli import load_model, pick_device, safe_name
    from ofa_scale.predict.inputs import read_captions
    from ofa_scale.vqgan import load_vqgan, to_pil

    if args.early_exit is not None or args.draw_boxes or args.answers:
        raise UserError("--early-exit, --draw-boxes and --answers do not apply to --task image_gen")
    if not args.vqgan:
        raise UserError("--task image_gen needs --vqgan DIR (a taming VQGAN: model.yaml + last.ckpt)")
    captions = read_captions(args.input, default_text=args.text)
    first = next(captions, None)
    if first is None:
        raise UserError(f"--input {args.input} holds no captions")
    device, dtype = pick_device(args.device)
    vqgan = load_vqgan(args.vqgan, device=device)
    loaded = load_model(args.model, args.tokenizer_path, ema=not args.no_ema)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    generator = ImageGenerator(model, loaded.tokenizer, vqgan, samples=args.samples, device=device)
    out = Path(args.out)
    image_dir = out.parent / f"{out.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    print(f"ofa-predict: image_gen with {loaded.description.get('checkpoint')} on {device} "
          f"({str(dtype).removeprefix('torch.')}), {args.samples} samples per caption, seed {args.seed}; "
          f"samples ranked by the model's log-probability (no CLIP)", file=sys.stderr)
    done = failed = 0
    start = time.perf_counter()
    with out.open("w", encoding="utf-8") as f:
        for number, item in enumerate(itertools.chain([first], captions)):
            line: dict[str, Any] = {"id": item.id}
            try:
                if item.error:
                    raise UserError(item.error)
                samples = generator.sample(item.text, args.seed + number)
                paths = []
                for rank, image in enumerate(to_pil(generator.render(samples))):
                    path = image_dir / f"{safe_name(item.id)}_{rank}.png"
                    image.save(path, format="PNG")
                    paths.append(str(path))
                line.update(images=paths, logprobs=[round(s.logprob, 4) for s in samples])
            except UserError as e:
                line["error"] = str(e)
            failed += "error" in line
            done += 1
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            print(f"ofa-predict: {done} captions, {failed} failed, "
                  f"{done / (time.perf_counter() - start):.3f} captions/s", file=sys.stderr)
    print(f"ofa-predict: {done} captions ({failed} failed) in {time.perf_counter() - start:.1f}s; wrote {out} "
          f"and {image_dir}/", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["ImageGenerator", "Sample", "run_image_gen", "PROMPT", "NUM_CODES"]

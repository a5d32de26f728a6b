"""Text-to-image finetuning (spec §7.6; extensions §10.5–§10.6): captions in, 1024 image codes out.

Records come from `ofa-preprocess shards --format image_gen` (data/tsv_formats.py): meta `codes` (1024 ints, a
32×32 grid in raster order) and `caption`; the id is the TSV's uniq-id.

* Source: bos + BPE(" what is the complete image? caption: {caption}") + eos, caption = pre_caption(·,
  task.max_src_length) (lower-cased, OFA's 64 words); no image (text-only encoder, as Gigaword/GLUE).
* Target: the codes as `<code_i>` ids + eos, prev_output = bos + the code ids, decoder in code mode
  (`code_mask`). OFA's `--constraint-range=50265,58457` is the GPT-2 layout; here the range is the tokenizer's own
  `<code_i>` ids, cut to the codes the image decoder has. Stage 1 (criterion ce) restricts the loss to that range
  (ids 0–3 stay allowed, as OFA) through the examples' `constraint: {"range": …}`; label smoothing 0.
* Stage 2 (criterion scst, §10.6.3): finetune/scst.py's step with this task's parts (`scst_parts`): 5 sampled
  code sequences per caption (top-k 256, exactly 1024 codes + eos), decoded to pictures, reward 2.5·cos(CLIP
  image, CLIP caption), baseline the mean of the caption's other samples, loss Σ −log p · (reward − baseline)
  over the constrained softmax, divided by the generated tokens.
* Validation / `ofa-eval run`: `task.decoding.beam` samples per caption (OFA: 24, top-k `task.decoding.sampling_topk`
  256, temperature 1), ranked by CLIP text–image cosine (`task.clip_weights`, open-clip `task.clip_arch`); metric
  `clip_score` = mean over captions of the best sample's cosine. Without CLIP weights the samples are ranked by
  the model's log-probability and `clip_score` is omitted (said once); `code_logprob` (mean per-code log-prob of
  the top-ranked sample) is always reported and is then the main metric. `fid` and `is` of the top-1 pictures
  (ofa-eval only, `final`) when `task.inception_weights` is given (`task.fid_reference`: the reference
  statistics for FID).
* Code grid: `task.extra.code_image_size` (OFA's --code-image-size; default 256 = a 32×32 grid, 1024 codes) is the
  picture side the codes describe, the grid its side / 8 (an f=8 VQGAN): 128 gives 16×16 = 256 codes, 64 gives 8×8.
  It must equal `model.overrides.code_image_size` (the decoder's 2-D code positions; checked when the task
  generates) and the records' code count (`ofa-preprocess sample --image-gen-code-size`). Smaller grids exist for
  tests and small experiments: the sequence and the sampling loop shrink with the square of the grid.
* Pictures: `task.vqgan` is the taming VQGAN directory that turns codes into pixels, or `colour` for the sample
  corpus' colour quantiser (data/sample_image_gen.py). `ofa-eval run` writes DIR/images/<id>_<rank>.png (best
  first; results.json lists them) and DIR/contact_sheet.png; the trainer writes the same under
  RUN_DIR/valid_images/step_N/ and both log them to mlflow when it is on.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.evaluation.clip_model import order_by
from ofa_scale.finetune.inputs import check_pairs
from ofa_scale.finetune.task import EvalItem, Example, FinetuneTask, Lockstep
from ofa_scale.finetune.text_inputs import NO_IMAGE, NO_IMAGE_SIZE, text_batch
from ofa_scale.model.generate import GenerationConfig, generate, max_generation_len
from ofa_scale.objectives.text import pre_caption
from ofa_scale.predict.image_gen import PROMPT

CLIP_REWARD_WEIGHT = 2.5  # OFA's clip_scst_loss.py (CLIPScore's w)
COLOUR_DECODER = "colour"  # task.vqgan value: the sample corpus' colour quantiser instead of a VQGAN
CODE_IMAGE_SIZE = 256  # OFA's --code-image-size: 32x32 codes of an f=8 VQGAN
VQGAN_FACTOR = 8  # pixels per code side (OFA's VQGAN, and the colour quantiser's patches)


def code_grid(cfg) -> int:
    """The code grid side of task.extra.code_image_size (module docstring); ConfigError when it is not a positive
    multiple of 8."""
    size = cfg.extra.get("code_image_size", CODE_IMAGE_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < VQGAN_FACTOR or size % VQGAN_FACTOR:
        raise ConfigError(f"task.extra.code_image_size is {size!r}; give the picture side the codes describe, a "
                          f"positive multiple of {VQGAN_FACTOR} (OFA: {CODE_IMAGE_SIZE}, a 32x32 code grid)")
    return size // VQGAN_FACTOR


def load_image_decoder(spec: Optional[str], device: torch.device | str = "cpu"):
    """codes -> pixels: a taming VQGAN directory, or `colour` (the sample corpus' colour quantiser); None: none."""
    if not spec:
        return None
    if spec == COLOUR_DECODER:
        from ofa_scale.data.sample_image_gen import ColourCodec

        return ColourCodec()
    from ofa_scale.vqgan import load_vqgan

    return load_vqgan(spec, device=device)


def load_clip(weights: str, arch: str, device):
    """H2's open-clip scorer (evaluation/clip_model.py) from a local weights file."""
    try:
        from ofa_scale.evaluation.clip_model import ClipScorer
    except ImportError as e:
        raise UserError(f"task.clip_weights is set but the CLIP scorer is not available ({e}); install "
                        f"open-clip-torch") from None
    return ClipScorer.load(Path(weights), arch=arch, device=device)


class ImageGenTask(FinetuneTask):
    name = "image_gen"
    source = "image_gen"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        num_codes = int(getattr(tokenizer, "num_codes", 0))
        if num_codes < 1:
            raise ConfigError("task image_gen needs a tokenizer with <code_i> tokens (OFA's 8192 image codes)")
        self.code_offset = int(tokenizer.code_offset)
        unknown = sorted(set(cfg.extra) - {"code_image_size"})
        if unknown:
            raise ConfigError(f"task.extra has {unknown} for task image_gen; it knows only code_image_size")
        self.grid = code_grid(cfg)
        self.codes_per_image = self.grid * self.grid
        if cfg.clip_weights and not cfg.vqgan:
            raise ConfigError("task.clip_weights ranks pictures, so task image_gen also needs task.vqgan (the VQGAN "
                              "directory that turns codes into pixels, or `colour` for the sample quantiser)")
        self._decoder = None
        self._decoder_device = None
        if cfg.vqgan == COLOUR_DECODER:
            num_codes = min(num_codes, 8192)
        self.num_codes = num_codes
        self.code_range = (self.code_offset, self.code_offset + num_codes)
        self.scorer = None  # a ClipScorer (or anything with cosine(images, texts)); loaded on first use
        self._said_no_clip = False
        self.metrics = (("clip_score", "code_logprob", "fid", "is") if cfg.clip_weights
                        else ("code_logprob", "fid", "is"))
        self._prompt_len = len(tokenizer.encode(PROMPT.format("")))

    @property
    def main_metric(self) -> str:
        if self.cfg.best_metric == "clip_score" and not self.cfg.clip_weights:
            return "code_logprob"  # no CLIP: the fallback ranking's metric (module docstring)
        return super().main_metric

    # ---- shapes ---------------------------------------------------------------------------------------------
    def lengths(self) -> tuple[int, int]:
        from ofa_scale.finetune.inputs import TOKENS_PER_WORD

        return self._prompt_len + TOKENS_PER_WORD * self.cfg.max_src_length + 2, self.codes_per_image + 1

    def caption_text(self, caption: str) -> str:
        return pre_caption(str(caption), self.cfg.max_src_length)

    def source_ids(self, caption_text: str) -> list[int]:
        return [self.tok.bos, *self.tok.encode(PROMPT.format(caption_text)), self.tok.eos]

    def code_ids(self, codes: Sequence[int], record_id: Any) -> list[int]:
        codes = [int(c) for c in codes]
        if len(codes) != self.codes_per_image:
            raise UserError(f"record {record_id!r} has {len(codes)} codes; text-to-image with "
                            f"task.extra.code_image_size={self.grid * VQGAN_FACTOR} needs {self.codes_per_image} "
                            f"({self.grid}x{self.grid})")
        bad = [c for c in codes if not 0 <= c < self.num_codes]
        if bad:
            raise UserError(f"record {record_id!r} has code {bad[0]} outside the {self.num_codes} codes of the "
                            f"tokenizer and image decoder")
        return [self.code_offset + c for c in codes]

    # ---- training -------------------------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        meta = record["meta"]
        text = self.caption_text(meta.get("caption", ""))
        if not text:
            return []
        codes = self.code_ids(meta["codes"], meta.get("uniq_id"))
        example = {"task": self.name, "source": self.source_ids(text), "target": codes + [self.tok.eos],
                   "prev_output": [self.tok.bos] + codes, "image": None, "patch_mask": False, "code_mask": True,
                   "conf": 1.0}
        if self.cfg.criterion == "scst":
            example["references"] = [text]  # the caption CLIP compares the sampled pictures with
        else:
            example["constraint"] = {"range": self.code_range}
        return [example]

    # ---- evaluation -----------------------------------------------------------------------------------------
    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta = record["meta"]
        text = self.caption_text(meta.get("caption", ""))
        if not text:
            return None
        return EvalItem(id=str(meta.get("uniq_id")), source=self.source_ids(text), image=NO_IMAGE,
                        decoder_prompt=[self.tok.bos], reference={"caption": text}, image_size=NO_IMAGE_SIZE)

    def generation_config(self, samples: int, nbest: Optional[int] = None) -> GenerationConfig:
        """OFA's sampling preset: `samples` rows per caption, top-k, exactly the grid's codes (1024) then eos."""
        d = self.cfg.decoding
        cfg = GenerationConfig(beam_size=samples, sampling=True, sampling_topk=d.sampling_topk,
                               temperature=d.temperature, min_len=self.codes_per_image, max_len_a=0.0,
                               max_len_b=self.codes_per_image,
                               constraint_range=self.code_range, nbest=nbest)
        cfg.validate()
        return cfg

    def decoder(self, device: torch.device | str = "cpu"):
        """The image decoder (task.vqgan) on `device`; UserError when none is configured."""
        if not self.cfg.vqgan:
            raise UserError("task.vqgan is not set: text-to-image needs the VQGAN (model.yaml + last.ckpt) that "
                            "turns codes into pixels, or `colour` for the sample corpus' colour quantiser")
        if self._decoder is None or (self.cfg.vqgan != COLOUR_DECODER and self._decoder_device != str(device)):
            self._decoder = load_image_decoder(self.cfg.vqgan, device)
            self._decoder_device = str(device)
        return self._decoder

    def pictures(self, codes: torch.Tensor, device: torch.device | str = "cpu") -> list:
        """PIL pictures of code rows (N, grid²)."""
        from ofa_scale.vqgan.images import to_pil

        dec = self.decoder(device)
        return to_pil(dec.decode(codes.long().to(device).view(-1, self.grid, self.grid)).cpu())

    def clip(self, device) -> Optional[Any]:
        """The CLIP scorer, or None (said once) when task.clip_weights is not set."""
        if self.scorer is None and self.cfg.clip_weights:
            self.scorer = load_clip(self.cfg.clip_weights, self.cfg.clip_arch, device)
        if self.scorer is None and not self._said_no_clip:
            print("image_gen: task.clip_weights is not set: samples are ranked by the model's log-probability and "
                  "clip_score is not reported", file=sys.stderr, flush=True)
            self._said_no_clip = True
        return self.scorer

    def predict(self, model: torch.nn.Module, items: Sequence[EvalItem], *, device: torch.device,
                dtype: torch.dtype = torch.float32, lockstep: Optional[Lockstep] = None) -> list[dict]:
        """Per item {"id", "codes": int16 (N, 1024) best first, "logprob": [N], "clip": [N] or None}."""
        samples = self.cfg.decoding.beam
        cfg = self.generation_config(samples)
        batch = text_batch(items, self.tok.pad, device)
        self.check_model(model)
        if max_generation_len(model, cfg, batch["src_tokens"].shape[1], True) < self.codes_per_image:
            raise UserError(f"the model decodes at most {max_generation_len(model, cfg, 1, True)} code tokens "
                            f"(model.code_image_size / max_target_positions); text-to-image needs "
                            f"{self.codes_per_image}")
        batch["code_masks"] = torch.ones(len(items), dtype=torch.bool, device=device)
        # one seed per batch from its first caption's id: the same pictures for the same batch on every run
        seed = zlib.crc32(str(items[0].id).encode()) if items else 0
        gen = torch.Generator(device=device).manual_seed(seed)
        hyps = generate(model, batch, cfg, generator=gen, lockstep=lockstep)
        scorer = self.clip(device)
        out = []
        for item, item_hyps in zip(items, hyps):
            codes, logprob = self.sample_codes(item_hyps)
            cosine = None
            if scorer is not None:
                cosine = scorer.cosine(self.pictures(codes, device), [item.reference["caption"]] * len(codes))
                cosine = torch.as_tensor(cosine, dtype=torch.float32).cpu()
            order = torch.tensor(order_by(cosine if cosine is not None else logprob), dtype=torch.long)
            out.append({"id": item.id, "codes": codes[order].to(torch.int16), "logprob": logprob[order].tolist(),
                        "clip": None if cosine is None else cosine[order].tolist()})
        return out

    def check_model(self, model: torch.nn.Module) -> None:
        """UserError unless the model's code grid is the task's: the decoder's 2-D code positions assume it."""
        config = getattr(getattr(model, "module", model), "config", None)
        grid = getattr(config, "code_grid_size", None)
        if grid is not None and grid != self.grid:
            raise UserError(f"the model's code grid is {grid}x{grid} (model.code_image_size {grid * VQGAN_FACTOR}) "
                            f"but the task's is {self.grid}x{self.grid} (task.extra.code_image_size "
                            f"{self.grid * VQGAN_FACTOR}); set both to the same value")

    def sample_codes(self, hyps) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (N, grid²) int64, log-prob of the code tokens (N,)) of one caption's sampled hypotheses."""
        n = self.codes_per_image
        for h in hyps:  # the generation config guarantees this; a violation is a generation bug
            if h.tokens.numel() != n + 1 or int(h.tokens[-1]) != self.tok.eos:
                raise RuntimeError(f"image generation returned {h.tokens.numel()} tokens, not {n} codes + eos")
        tokens = torch.stack([h.tokens[:n] for h in hyps]).long()
        logprob = torch.stack([h.positional_scores[:n].sum() for h in hyps]).float()
        return tokens - self.code_offset, logprob

    def score(self, predictions: Sequence[dict], items: Sequence[EvalItem], *, final: bool = False
              ) -> dict[str, float]:
        check_pairs(predictions, items)
        out = {"code_logprob": float(np.mean([p["logprob"][0] / self.codes_per_image for p in predictions]))}
        if all(p.get("clip") for p in predictions):
            out["clip_score"] = float(np.mean([p["clip"][0] for p in predictions]))
        if final and self.cfg.inception_weights:
            from ofa_scale.evaluation.image_metrics import inception_scores

            best = self.pictures(torch.stack([p["codes"][0] for p in predictions]))
            reference = Path(self.cfg.fid_reference) if self.cfg.fid_reference else None
            out.update({k: float(v) for k, v in inception_scores(best, Path(self.cfg.inception_weights),
                                                                 reference=reference).items()})
        return out

    def result_entry(self, prediction: dict) -> dict:
        return {"id": str(prediction["id"]), "images": list(prediction.get("images", []))}

    # ---- files ----------------------------------------------------------------------------------------------
    def write_artifacts(self, out_dir: str | Path, predictions: Sequence[dict], items: Sequence[EvalItem]
                        ) -> list[Path]:
        """DIR/images/<id>_<rank>.png for every sample (best first; sets each prediction's "images" to these paths
        relative to DIR) and DIR/contact_sheet.png (a row per caption, its best samples labelled with their CLIP
        cosine or log-probability). Rank 0."""
        from ofa_scale.evaluation.contact_sheet import RankedSheet, write_ranked_pngs

        out = Path(out_dir)
        written: list[Path] = []
        if not self.cfg.vqgan:  # codes without a decoder: the metrics stand, there are no pictures to write
            print("image_gen: task.vqgan is not set: no PNGs or contact sheet written", file=sys.stderr, flush=True)
            for p in predictions:
                p["images"] = []
            return written
        sheet = RankedSheet()
        for p, item in zip(predictions, items):
            pictures = self.pictures(p["codes"])
            paths = write_ranked_pngs(pictures, out / "images", p["id"])
            p["images"] = [x.relative_to(out).as_posix() for x in paths]  # relative to results.json's folder
            labels = ([f"clip {c:.3f}" for c in p["clip"]] if p.get("clip")
                      else [f"logp {lp / self.codes_per_image:.2f}" for lp in p["logprob"]])
            sheet.add(item.reference["caption"], pictures, labels)
            written += paths
        if sheet.rows:
            written.append(Path(sheet.write(out / "contact_sheet.png")))
        return written

    # ---- stage 2 --------------------------------------------------------------------------------------------
    def scst_parts(self, device, reward=None):
        """(ScstSettings, reward, decode) of CLIP-SCST for finetune/scst.py's step (module docstring). `reward`
        replaces CLIP (tests)."""
        from ofa_scale.finetune.scst import ScstSettings

        if self.cfg.scst.beam < 2:
            raise ConfigError(f"task.scst.beam is {self.cfg.scst.beam}; CLIP-SCST's baseline is the mean of a "
                              f"caption's other samples, so it needs at least 2 (OFA: 5)")
        if reward is None:
            if not self.cfg.clip_weights:
                raise ConfigError("task.criterion=scst for image_gen rewards pictures by CLIP similarity; set "
                                  "task.clip_weights (OFA: ViT-B/16)")
            reward = ClipReward(load_clip(self.cfg.clip_weights, self.cfg.clip_arch, device))
        self.decoder(device)  # fail before the first step when task.vqgan is missing
        settings = ScstSettings(generation=self.generation_config(self.cfg.scst.beam),
                                constraint_range=self.code_range)
        n = self.codes_per_image
        return settings, reward, lambda tokens: self.pictures(tokens[:n].view(1, -1) - self.code_offset,
                                                             device)[0]


class ClipReward:
    """reward(pictures of one caption, [caption]) = 2.5 · cos(CLIP image, CLIP caption) per picture."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, pictures: Sequence[Any], references: Sequence[str]) -> np.ndarray:
        cosine = self.scorer.cosine(list(pictures), [references[0]] * len(pictures))
        return CLIP_REWARD_WEIGHT * torch.as_tensor(cosine, dtype=torch.float64).cpu().numpy()


__all__ = ["ImageGenTask", "ClipReward", "load_image_decoder", "CLIP_REWARD_WEIGHT", "COLOUR_DECODER", "code_grid"]

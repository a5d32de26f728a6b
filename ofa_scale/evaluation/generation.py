"""Generate predictions for evaluation samples with `ofa_scale.model.generate` (spec §7 decoding settings).

* caption: beam 5, max_len_b 16, no_repeat_ngram 3, length-normalised (spec §7.1).
* vqa: beam 5, unnormalised, constrained by a trie over the candidate answers (`[bos] + BPE(" " + answer) +
  [eos]`, spec §6.3). The candidates come from a candidate file only (`ofa-preprocess vqa-answers`, OFA's
  trainval_ans2label), never from the evaluated questions' references, which would leak the labels. The decoder
  starts from bos, as our pretraining builds VQA targets (OFA's zero-shot `--prompt-type none`).
* grounding: beam 5, exactly 4 tokens (min_len = max_len_b = 4), no_repeat_ngram 3, restricted to `<bin>`
  tokens (OFA leaves decoding unconstrained; a trained model emits bins anyway, an undertrained one would
  otherwise produce boxes that cannot be read), then bins → box in the stored image's pixels.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.grounding import bins_to_box
from ofa_scale.evaluation.model_source import InputGeometry
from ofa_scale.evaluation.vl_inputs import EvalSample
from ofa_scale.model.generate import GenerationConfig, generate
from ofa_scale.utils.trie import Trie

VQA_MAX_ANSWER_TOKENS = 30  # OFA's max_tgt_length for VQA


def batch_inputs(samples: Sequence[EvalSample], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(s.source) for s in samples)
    src = torch.full((len(samples), width), pad, dtype=torch.long)
    for i, s in enumerate(samples):
        src[i, :len(s.source)] = torch.tensor(s.source, dtype=torch.long)
    return {"src_tokens": src, "patch_images": torch.stack([s.image for s in samples]),
            "patch_masks": torch.ones(len(samples), dtype=torch.bool)}


def answer_trie(answers: Sequence[str], tok: Any) -> Trie:
    """The trie of the candidate answers (a candidate file's lines), `[bos] + BPE(" " + answer) + [eos]` each."""
    answers = [a for a in dict.fromkeys(a.strip() for a in answers) if a]
    if not answers:
        raise UserError("VQA evaluation needs candidate answers: give --answers FILE (one answer per line, as "
                        "`ofa-preprocess vqa-answers` writes)")
    return Trie.from_answers([tok.encode(" " + a) for a in answers], bos=tok.bos, eos=tok.eos)


def decoding_config(task: str, tok: Any, beam_size: Optional[int] = None) -> GenerationConfig:
    """The task's OFA decoding settings (spec §7); `beam_size` overrides the beam for every task."""
    extra = {} if beam_size is None else {"beam_size": beam_size}
    if task == "caption":
        return GenerationConfig.for_task("caption", nbest=1, **extra)
    if task == "vqa":
        return GenerationConfig.for_task("vqa", nbest=1, max_len_b=VQA_MAX_ANSWER_TOKENS, **extra)
    return GenerationConfig.for_task("grounding", nbest=1,
                                     constraint_range=(tok.bin_offset, tok.bin_offset + tok.num_bins), **extra)


def _text(tok: Any, tokens: torch.Tensor) -> str:
    ids = [t for t in tokens.tolist() if t < len(tok)]  # padded vocabularies may hold ids the tokenizer lacks
    return tok.decode(ids, skip_special_tokens=True).strip()


def prediction_record(sample: EvalSample, tokens: torch.Tensor, tok: Any, geometry: InputGeometry) -> dict:
    if sample.task == "caption":
        return {"id": sample.id, "caption": _text(tok, tokens)}
    if sample.task == "vqa":
        return {"id": sample.id, "answer": _text(tok, tokens)}
    bins = [int(t) - tok.bin_offset for t in tokens.tolist()[:4]]
    width, height = sample.image_size
    # bins → pixels of the S×S input (bin/(n-1)·normaliser) → stored-image pixels (× W/S, × H/S)
    size = geometry.grounding_image_size
    box = bins_to_box(bins, width, height, num_bins=geometry.num_bins, max_image_size=geometry.box_normaliser,
                      input_size=size)
    return {"id": sample.id, "box": box, "bins": bins}


@torch.no_grad()
def predict(model: torch.nn.Module, samples: Sequence[EvalSample], tok: Any, geometry: InputGeometry, *,
            batch_size: int, device: torch.device, answers: Sequence[str] = (),
            beam_size: Optional[int] = None) -> list[dict]:
    """One prediction record per sample (same order); `answers`: the VQA candidates (required for VQA)."""
    if not samples:
        return []
    task = samples[0].task
    cfg = decoding_config(task, tok, beam_size)
    trie = answer_trie(answers, tok) if task == "vqa" else None
    out: list[dict] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in batch_inputs(chunk, tok.pad).items()}
        hyps = generate(model, batch, cfg, constraint_trie=trie)
        for sample, best in zip(chunk, hyps):
            tokens = best[0].tokens if best else torch.tensor([tok.eos])
            out.append(prediction_record(sample, tokens, tok, geometry))
    return out

"""Caption stage 2: self-critical sequence training with a CIDEr-D reward (OFA's scst_reward_criterion, spec §6.2).

    reward = CiderReward(cfg.task.cider_df)                  # cached document frequencies (`ofa-eval cider-df`)
    stats = run_scst_step(engine, ctx, micro_batches, model=engine.module.model, to_inputs=to_inputs,
                          settings=ScstSettings.from_task(cfg.task), reward=reward,
                          decode=caption_text, acc=acc)       # instead of training.step.run_step
    # decode: generated token ids -> caption text, as the caption task decodes its predictions

For each micro-batch of this rank:
1. the model in eval mode, without gradients, runs the task's `task.scst` beam search (beam 5, at most 16 tokens,
   no-repeat-3) and keeps **all** `beam` hypotheses of every image (`nbest = beam`);
2. each hypothesis is decoded and scored with CIDEr-D against all of its image's references
   (`CiderD.score_scst`: punctuation removed, ` <eos>` appended, document frequencies from the cache);
3. its baseline is the mean score of the image's other hypotheses; advantage = score − baseline;
4. the model in train mode is teacher-forced on the hypotheses (prev_output = bos + hypothesis without its eos,
   target = hypothesis with eos; each image's encoder inputs repeated once per hypothesis), and the loss is
   Σ_tokens −log p(token) · advantage.
The loss is divided by the number of generated (non-pad target) tokens of the whole global batch — every
micro-batch of every data-parallel rank, summed by one all-reduce after generation — so, as in `run_step`, the
value is independent of the data-parallel size and the gradient is OFA's (fairseq divides by the summed
sample_size). The log-probabilities come from the objectives' TokenLoss with the advantage as the per-row weight
(`conf`) and no smoothing: vocabulary-parallel under tensor parallelism, padded vocabulary rows excluded.

Distributed: generation runs under a lockstep when the world has more than one process (every rank runs the same
number of decoder forwards, so ZeRO-3's and TP's collective forwards line up however long each rank's captions
are), and every micro-batch gets exactly one forward and one backward on every rank, even one without any image
to score (a one-row placeholder with no target tokens: its loss is an exact 0 with a gradient of zeros).
Placeholders run in the decoder mode of the real rows (code mode for image_gen, `ScstSettings.code_mode`), so every
rank calls the same modules. Sampled hypotheses (image_gen) draw from a generator seeded by the micro-batch's
captions and the optimizer step (`sampling_generator`), so a data-parallel step samples what one process does.
Rows of a micro-batch without references (the Collator's padding rows) are not generated for.

References reach the step through the group batch: `group_batch["references"]`, a list with one list of caption
strings per row (empty for padding rows).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ofa_scale.errors import ConfigError
from ofa_scale.model.generate import BOS, EOS, PAD, GenerationConfig, Hypothesis, generate
from ofa_scale.objectives.token_loss import TokenLosses, make_token_loss
from ofa_scale.parallel import collectives
from ofa_scale.parallel.tensor_parallel import full_vocabulary_logits

Decode = Callable[[torch.Tensor], str]  # generated token ids (eos last) -> caption text


@dataclass
class ScstSettings:
    generation: GenerationConfig  # the scst-args, nbest = beam
    group: str = "vl"  # the batch group the finetuning workload fills
    pad: int = PAD
    bos: int = BOS
    # image_gen (finetune/image_gen.py): the teacher-forced softmax over ids 0-3 and the code range only, as the
    # samples were drawn (OFA's clip_scst_loss masks the logits outside its constraint range)
    constraint_range: Optional[tuple[int, int]] = None

    @property
    def code_mode(self) -> bool:
        """Samples are image codes (image_gen, the one user of `constraint_range`): decoder code mode. A rank's
        placeholder forwards must run in it too, or ZeRO-3's per-module gathers (code_layernorm_embedding, the image
        positions) differ between ranks and hang."""
        return self.constraint_range is not None

    @classmethod
    def from_task(cls, task_cfg, group: str = "vl") -> "ScstSettings":
        """From the `task:` section: `task.scst` is OFA's --scst-args."""
        from ofa_scale.finetune.inputs import generation_config

        s = task_cfg.scst
        if s.inference != "beam":
            raise ConfigError("task.scst.inference must be beam: SCST scores generated captions")
        if s.beam < 2:
            raise ConfigError(f"task.scst.beam is {s.beam}; SCST's baseline is the mean of an image's other "
                              f"hypotheses, so it needs a beam of at least 2 (OFA: 5)")
        return cls(generation=generation_config(s, nbest=s.beam), group=group)


class CiderReward:
    """CIDEr-D of each hypothesis of one image against that image's references, with cached document frequencies
    (a `DocumentFrequencies`, or the path of an `ofa-eval cider-df` cache / OFA `*-words.p` file)."""

    def __init__(self, df):
        from ofa_scale.evaluation.metrics.cider import CiderD

        if df is None:
            raise ConfigError("task.criterion=scst needs task.cider_df: the CIDEr document frequencies of the "
                              "training references (build them with `ofa-eval cider-df`)")
        self.cider = CiderD(df)

    def __call__(self, hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
        return self.cider.score_scst(list(hypotheses), [list(references)] * len(hypotheses))


def advantages(scores: torch.Tensor) -> torch.Tensor:
    """score − mean of the other hypotheses' scores of the same image (OFA's baseline); (n,) -> (n,)."""
    n = scores.numel()
    if n < 2:
        return torch.zeros_like(scores)
    return scores - (scores.sum() - scores) / (n - 1)


@dataclass
class Rollout:
    """One micro-batch's hypotheses, ready for the teacher-forced pass."""

    rows: torch.Tensor  # (H,) the source row of each hypothesis
    prev: torch.Tensor  # (H, L) bos + hypothesis without eos, pad-padded
    target: torch.Tensor  # (H, L) hypothesis with eos, pad-padded (all pad: a placeholder, nothing to learn)
    advantage: torch.Tensor  # (H,) fp32
    scores: list[float]  # the CIDEr-D reward of each real hypothesis
    images: int  # images that were scored

    @property
    def tokens(self) -> int:
        return int((self.target != PAD).sum())


def hypothesis_tensors(hyps: Sequence[torch.Tensor], bos: int = BOS, pad: int = PAD
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev, target) for generated sequences that end with eos: prev = bos + tokens[:-1], target = tokens."""
    width = max(len(h) for h in hyps)
    prev = torch.full((len(hyps), width), pad, dtype=torch.long)
    target = torch.full((len(hyps), width), pad, dtype=torch.long)
    for i, h in enumerate(hyps):
        h = h.long()
        target[i, :len(h)] = h
        prev[i, 0] = bos
        prev[i, 1:len(h)] = h[:-1]
    return prev, target


def _placeholder(bos: int = BOS, pad: int = PAD) -> Rollout:
    """One hypothesis with no target token: keeps this rank's forward/backward count when it has nothing to learn."""
    return Rollout(rows=torch.zeros(1, dtype=torch.long), prev=torch.tensor([[bos]]), target=torch.tensor([[pad]]),
                   advantage=torch.zeros(1), scores=[], images=0)


def sampling_generator(src_tokens: torch.Tensor, step: int) -> torch.Generator:
    """The generator of one micro-batch's sampled hypotheses (image_gen), seeded by its captions' tokens and the
    optimizer step: the draws do not depend on which rank holds the micro-batch or what it decoded before, so a
    data-parallel step samples what one process does."""
    seed = zlib.crc32(src_tokens.cpu().numpy().tobytes() + int(step).to_bytes(8, "little"))
    return torch.Generator(device=src_tokens.device).manual_seed(seed)


def rollout(model: torch.nn.Module, inputs: dict, references: Sequence[Sequence[str]], settings: ScstSettings,
            reward: Callable[[Sequence[str], Sequence[str]], np.ndarray], decode: Decode,
            lockstep: Optional[Callable[[bool], bool]] = None, step: int = 0) -> Rollout:
    """Steps 1-3 of the module docstring for one micro-batch (`inputs`: the model kwargs of its rows). The caller
    puts the model in eval mode."""
    if references is None:
        raise ValueError("SCST needs the group batch's 'references' (one list of captions per row); the finetuning "
                         "workload must carry the examples' references through the collation")
    rows = [i for i, refs in enumerate(references) if refs]
    index = torch.tensor(rows, dtype=torch.long)
    keys = [k for k in ("src_tokens", "patch_images", "patch_masks", "code_masks") if inputs.get(k) is not None]
    gen_inputs = {k: inputs[k].index_select(0, index.to(inputs[k].device)) for k in keys}
    if not rows and lockstep is not None:
        # nothing to sample: still step with the other ranks, on a placeholder in their decoder mode
        placeholder = teacher_forced_inputs(inputs, _placeholder(settings.bos, settings.pad), settings.code_mode)
        gen_inputs = {k: placeholder[k] for k in keys}
    gen = sampling_generator(gen_inputs["src_tokens"], step) if settings.generation.sampling else None
    with torch.no_grad(), full_vocabulary_logits(model):
        hyps: list[list[Hypothesis]] = generate(model, gen_inputs, settings.generation, generator=gen,
                                                lockstep=lockstep)
    if not rows:
        return _placeholder(settings.bos, settings.pad)
    seqs, owner, adv, scores = [], [], [], []
    for row, row_hyps in zip(rows, hyps):
        if not row_hyps:
            continue
        texts = [decode(h.tokens) for h in row_hyps]
        row_scores = torch.as_tensor(reward(texts, references[row]), dtype=torch.float64)
        adv.append(advantages(row_scores))
        scores.extend(float(s) for s in row_scores)
        seqs.extend(h.tokens for h in row_hyps)
        owner.extend([row] * len(row_hyps))
    if not seqs:
        return _placeholder(settings.bos, settings.pad)
    prev, target = hypothesis_tensors(seqs, settings.bos, settings.pad)
    return Rollout(rows=torch.tensor(owner, dtype=torch.long), prev=prev, target=target,
                   advantage=torch.cat(adv).float(), scores=scores, images=len(adv))


def teacher_forced_inputs(inputs: dict, ro: Rollout, code_mode: bool = False) -> dict:
    """The model kwargs of the hypotheses: each row's encoder inputs repeated per hypothesis, prev_output the
    hypothesis. `code_mode`: a placeholder's decoder mode (`ScstSettings.code_mode`)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and key != "prev_output_tokens":
            out[key] = value.index_select(0, ro.rows.to(value.device))
        else:
            out[key] = value
    if ro.images == 0:  # placeholder: a text-only [bos, eos] source (a padding row may have no valid key at all)
        src = torch.full_like(out["src_tokens"], PAD)
        src[:, 0], src[:, 1] = BOS, EOS
        out["src_tokens"] = src
        out["patch_masks"] = torch.zeros_like(out["patch_masks"])
        if "patch_images" in out:
            out["patch_images"] = torch.zeros_like(out["patch_images"])
        if "code_masks" in out:
            out["code_masks"] = torch.full_like(out["code_masks"], code_mode)
    out["prev_output_tokens"] = ro.prev.to(out["src_tokens"].device)
    return out


def scst_loss(token_loss, logits: torch.Tensor, ro: Rollout, denominator: float,
              constraint_range: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, TokenLosses]:
    """(Σ −log p(token)·advantage / denominator, the token losses) for one micro-batch's hypotheses."""
    device = logits.device
    tl = token_loss(logits, ro.target.to(device), conf=ro.advantage.to(device), constraint_range=constraint_range)
    return tl.nll.float().sum() / denominator, tl


@dataclass
class ScstStats:
    """Global over the step (every rank the same values)."""

    loss: float
    reward: float  # mean CIDEr-D of the generated hypotheses
    tokens: int  # generated tokens (the loss denominator)
    hypotheses: int


def default_lockstep() -> Optional[Callable[[bool], bool]]:
    if collectives.world_size() <= 1:
        return None
    return lambda done: not collectives.any_rank(not done)


def run_scst_step(engine, ctx, micro_batches: Sequence[dict[str, Any]], *, model: torch.nn.Module,
                  to_inputs: Callable[[str, dict, int], dict], settings: ScstSettings,
                  reward: Callable[[Sequence[str], Sequence[str]], np.ndarray], decode: Decode, acc=None,
                  lockstep: Optional[Callable[[bool], bool]] = None) -> ScstStats:
    """One SCST optimizer step over this rank's micro-batches (module docstring). `engine` is called like
    `run_step` calls it (`engine({group: inputs})[group]`, DeepSpeed's wrapped GroupsForward); `model` is the
    OFAModel inside it (generation calls its encoder and decoder). `acc` (a TaskAccumulator) receives the same
    per-task sums as run_step records. Lockstep defaults to `default_lockstep()`."""
    from ofa_scale.training.step import record_group

    if lockstep is None:
        lockstep = default_lockstep()
    group, pad = settings.group, settings.pad
    module = getattr(engine, "module", model)
    inputs = [to_inputs(group, mb[group], m) for m, mb in enumerate(micro_batches)]
    step = int(getattr(engine, "global_steps", 0))  # DeepSpeed's optimizer step count, the same on every rank
    module.eval()
    try:
        rollouts = [rollout(model, inp, mb[group].get("references"), settings, reward, decode, lockstep, step)
                    for inp, mb in zip(inputs, micro_batches)]
    finally:
        module.train()
    mine = [sum(ro.tokens for ro in rollouts), sum(sum(ro.scores) for ro in rollouts),
            sum(len(ro.scores) for ro in rollouts)]
    tokens, reward_sum, hyp_count = collectives.reduce_sum_list(mine, ctx.dp_group)
    denominator = max(tokens, 1.0)

    token_loss = make_token_loss(ctx, 0.0, pad)
    gas, dp = len(micro_batches), ctx.dp_size
    objective = 0.0
    for inp, ro, mb in zip(inputs, rollouts, micro_batches):
        tf = teacher_forced_inputs(inp, ro, settings.code_mode)
        logits = engine({group: tf})[group]
        total, tl = scst_loss(token_loss, logits, ro, denominator, settings.constraint_range)
        if acc is not None and ro.images:
            task_ids = mb[group]["task_ids"].index_select(0, ro.rows)
            record_group(acc, {"task_ids": task_ids, "src_tokens": tf["src_tokens"],
                               "prev_output_tokens": tf["prev_output_tokens"]}, tl, pad)
        value = float(total.detach())
        objective += value
        if acc is not None:
            acc.add_objective(value)
        # DeepSpeed divides by the accumulation steps and averages over data-parallel ranks: undo both
        engine.backward(total * (gas * dp))
        engine.step()
    (objective,) = collectives.reduce_sum_list([objective], ctx.dp_group)
    return ScstStats(loss=objective, reward=reward_sum / max(hyp_count, 1.0), tokens=int(tokens),
                     hypotheses=int(hyp_count))

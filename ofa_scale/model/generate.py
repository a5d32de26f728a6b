"""Sequence generation for OFA (spec §6.3, §7): greedy, beam search, top-k sampling, all-candidate scoring.

Semantics follow fairseq's SequenceGenerator as OFA uses it:
* The decoder starts from `bos`; `prefix_tokens` (per sample, without bos) are forced first - OFA's decoder
  prompts. Lengths count forced tokens: eos is banned while `step < min_len`, and at `step == max_len` eos is
  forced, where max_len = min(max_len_a · src_len + max_len_b, the decoder's position limit) and src_len is the
  padded source length. A hypothesis holds at most max_len tokens plus eos.
* Scores are sums of log-probabilities (forced prefix tokens included); a finished hypothesis of n tokens
  (eos counted) scores sum / n^lenpen unless `unnormalized`.
* Beam search keeps 2·beam candidates per step; eos candidates among the first `beam` are finalised, the first
  `beam` non-eos candidates continue; a sentence is done when it has `beam` finished hypotheses. At step 0 only
  the first beam is expanded (all beams are identical).
* Constraints mask the *logits* before the softmax (OFA): a trie (`utils.trie.Trie`, answers inserted as
  `[bos] + answer + [eos]`) allows `trie.get_next_layer([bos] + tokens generated after the prefix)`;
  `constraint_range=(start, end)` allows ids in [start, end) plus the special ids 0-3 in the softmax, and then
  bans every special but eos from being chosen (so `<code>`-only image generation emits exactly max_len codes
  when min_len = max_len). `pad` and `bos` are never generated.
* `no_repeat_ngram_size` bans a token that would repeat an n-gram of the hypothesis (bos and prefix included).
* Sampling draws each row independently from the top-k (k ≤ 0: all) of softmax(logits / temperature) with the
  given torch.Generator; `beam_size` rows per sample (OFA image generation: beam 24, top-k 256).

The KV cache lives in an `incremental_state` dict handed to `model.decoder`; cross-attention keys/values are
computed on the first step and reused. `use_cache=False` recomputes the whole prefix every step (reference path).

All-candidate scoring: `score_candidates` runs each prompt once and each shared answer prefix once
(model/candidates.py); `score_candidates_naive` is OFA's way, the reference it is tested and benchmarked against.
Distributed evaluation passes a `lockstep` so that every rank runs the same number of decoder forwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch.nn import functional as F

from ofa_scale.errors import ConfigError
from ofa_scale.model import early_exit
from ofa_scale.model.candidates import run_in_lockstep, score_tree
from ofa_scale.utils.trie import Trie

BOS, PAD, EOS, UNK = 0, 1, 2, 3
NUM_SPECIAL = 4  # ids 0-3 are bos, pad, eos, unk (fairseq Dictionary)


@dataclass
class GenerationConfig:
    beam_size: int = 5
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    max_len: int | None = None  # extra hard cap on generated tokens (before eos)
    lenpen: float = 1.0
    unnormalized: bool = False
    no_repeat_ngram_size: int = 0
    greedy: bool = False  # argmax decoding (same result as beam_size=1, cheaper)
    sampling: bool = False
    sampling_topk: int = -1
    temperature: float = 1.0
    constraint_range: tuple[int, int] | None = None
    nbest: int | None = None  # hypotheses returned per sample; default all (beam_size)
    use_cache: bool = True

    def validate(self) -> None:
        if self.beam_size < 1:
            raise ConfigError(f"generation.beam_size={self.beam_size} must be at least 1")
        if self.min_len < 0 or self.max_len_b < 0 or self.max_len_a < 0:
            raise ConfigError("generation.min_len, max_len_a and max_len_b must be non-negative")
        if self.temperature <= 0:
            raise ConfigError(f"generation.temperature={self.temperature} must be positive")
        if self.greedy and self.sampling:
            raise ConfigError("generation.greedy and generation.sampling exclude each other; pick one")
        if self.constraint_range is not None:
            start, end = self.constraint_range
            if not 0 <= start < end:
                raise ConfigError(f"generation.constraint_range={self.constraint_range} must be (start, end) "
                                  "with 0 <= start < end")


    @classmethod
    def for_task(cls, task: str, **overrides) -> "GenerationConfig":
        """OFA's evaluation decoding settings (spec §7) for `task`, with optional field overrides."""
        if task not in TASK_DECODING:
            raise ConfigError(f"no decoding preset for task {task!r}; choose one of {', '.join(TASK_DECODING)} "
                              "or build GenerationConfig(...) directly")
        cfg = cls(**{**TASK_DECODING[task], **overrides})
        cfg.validate()
        return cfg

    @classmethod
    def from_ofa_args(cls, args: Mapping[str, object]) -> "GenerationConfig":
        """From OFA/fairseq `--eval-args`/`--scst-args` JSON keys (beam, lenpen, min_len, max_len_a, max_len_b,
        no_repeat_ngram_size, sampling_topk, temperature, unnormalized, constraint_range "start,end")."""
        fields: dict[str, object] = {}
        for key, value in args.items():
            if key == "beam":
                fields["beam_size"] = int(value)
            elif key == "sampling_topk":
                fields["sampling_topk"] = int(value)
                fields["sampling"] = int(value) > 0
            elif key == "constraint_range":
                start, end = (int(x) for x in str(value).split(","))
                fields["constraint_range"] = (start, end)
            elif key in ("lenpen", "min_len", "max_len_a", "max_len_b", "no_repeat_ngram_size", "temperature",
                         "unnormalized"):
                fields[key] = value
            else:
                raise ConfigError(f"unknown OFA generation argument {key!r}; supported: beam, lenpen, min_len, "
                                  "max_len_a, max_len_b, no_repeat_ngram_size, sampling_topk, temperature, "
                                  "unnormalized, constraint_range")
        cfg = cls(**fields)
        cfg.validate()
        return cfg


# spec §7: what OFA's evaluation scripts pass (SNLI-VE, ImageNet and VQA "allcand" use score_candidates instead)
TASK_DECODING: dict[str, dict] = {
    "caption": dict(beam_size=5, max_len_a=0.0, max_len_b=16, min_len=1, no_repeat_ngram_size=3, lenpen=1.0),
    "vqa": dict(beam_size=5, unnormalized=True, temperature=1.0),  # with the answer trie + prompt as prefix
    "vqa_zeroshot": dict(beam_size=20, unnormalized=True),
    "grounding": dict(beam_size=5, min_len=4, max_len_a=0.0, max_len_b=4, no_repeat_ngram_size=3),
    "gigaword": dict(beam_size=6, lenpen=0.7, max_len_b=32, no_repeat_ngram_size=3),
    "image_gen": dict(beam_size=24, sampling=True, sampling_topk=256, temperature=1.0, min_len=1024,
                      max_len_a=0.0, max_len_b=1024, constraint_range=(50265, 58457)),
}


@dataclass
class Hypothesis:
    tokens: torch.Tensor  # (n,) generated ids incl. forced prefix, ending with eos; no leading bos
    score: float  # sum of log-probs, / n^lenpen unless unnormalized
    positional_scores: torch.Tensor  # (n,) log-prob of each token


# ------------------------------------------------------------------------------------------- decoding plumbing
def _reorder_encoder_out(model, encoder_out, order: torch.Tensor):
    reorder = getattr(model, "reorder_encoder_out", None) or model.encoder.reorder_encoder_out
    return reorder(encoder_out, order)


def _normalise_images(images: torch.Tensor | None) -> torch.Tensor | None:
    """Micro-batches carry uint8 images (docs/interfaces.md §4); the model takes (x/255 - 0.5)/0.5 floats."""
    if images is None or images.is_floating_point():
        return images
    return (images.float() / 255.0 - 0.5) / 0.5


def encode(model, batch: Mapping[str, torch.Tensor]):
    return model.encoder(src_tokens=batch["src_tokens"], patch_images=_normalise_images(batch.get("patch_images")),
                         patch_masks=batch.get("patch_masks"))


class _Stepper:
    """Runs the decoder one step at a time for a set of rows, with or without the KV cache."""

    def __init__(self, model, encoder_out, code_masks: torch.Tensor | None, use_cache: bool):
        self.model = model
        self.encoder_out = encoder_out
        self.code_masks = code_masks
        self.state: dict | None = {} if use_cache else None

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model.decoder(tokens, self.encoder_out, code_masks=self.code_masks,
                                 incremental_state=self.state)
        return out[:, -1, :].float()

    def reorder(self, order: torch.Tensor) -> None:
        self.encoder_out = _reorder_encoder_out(self.model, self.encoder_out, order)
        if self.code_masks is not None:
            self.code_masks = self.code_masks.index_select(0, order)
        if self.state is not None:
            self.model.decoder.reorder_incremental_state(self.state, order)

    def idle(self, fed: torch.Tensor, lockstep: Callable[[bool], bool] | None) -> None:
        """This rank's rows are all finished (`fed`: the tokens of its last step). With a lockstep, keep stepping
        one of them on, outputs ignored, until every rank is done: each rank then runs the same number of decoder
        forwards, which ZeRO-3 (parameter gathers) and TP (all-reduces) need. The row grows by one token per step
        like the other ranks' rows, so it never passes a position they reach."""
        if lockstep is None:
            return
        row = fed[:1]
        self.reorder(torch.zeros(1, dtype=torch.long, device=fed.device))
        while not lockstep(True):
            row = torch.cat([row, row.new_full((1, 1), EOS)], dim=1)
            self.logits(row)


class _Rows:
    """Per-row decoding constraints (forced prefix, trie) that follow the rows through reorders."""

    def __init__(self, prefix: torch.Tensor, prefix_len: torch.Tensor, tries: list[Trie | None] | None):
        self.prefix, self.prefix_len, self.tries = prefix, prefix_len, tries

    def reorder(self, order: torch.Tensor) -> None:
        self.prefix = self.prefix.index_select(0, order)
        self.prefix_len = self.prefix_len.index_select(0, order)
        if self.tries is not None:
            idx = order.tolist()
            self.tries = [self.tries[i] for i in idx]


def _banned_ngram_tokens(history: list[int], n: int) -> list[int]:
    if len(history) < n:
        return []
    tail = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    return [history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == tail]


def next_token_lprobs(logits: torch.Tensor, tokens: torch.Tensor, step: int, rows: _Rows,
                      cfg: GenerationConfig, max_len: int) -> torch.Tensor:
    """Processed log-probs (N, V) for position step+1, given tokens[:, :step+1] (see the module docstring)."""
    n, vocab = logits.shape
    forced = rows.prefix_len > step  # rows still inside their forced prefix
    free = ~forced
    logits = logits.clone()
    if bool(free.any()):
        if rows.tries is not None:
            allowed = torch.zeros(n, vocab, dtype=torch.bool, device=logits.device)
            for r in free.nonzero().flatten().tolist():
                trie = rows.tries[r]
                if trie is None:
                    allowed[r] = True
                    continue
                start = int(rows.prefix_len[r]) + 1
                allowed[r, trie.get_next_layer([BOS, *tokens[r, start:step + 1].tolist()])] = True
            logits.masked_fill_(~allowed & free[:, None], -math.inf)
        if cfg.constraint_range is not None:
            start, end = cfg.constraint_range
            outside = torch.ones(vocab, dtype=torch.bool, device=logits.device)
            outside[start:end] = False
            outside[:NUM_SPECIAL] = False
            logits.masked_fill_(outside[None, :] & free[:, None], -math.inf)
    lprobs = F.log_softmax(logits / cfg.temperature, dim=-1)
    lprobs[:, PAD] = -math.inf
    lprobs[:, BOS] = -math.inf
    if cfg.constraint_range is not None:
        lprobs[:, UNK] = -math.inf
    if step >= max_len:  # force eos (keeping its log-prob)
        eos_lp = lprobs[:, EOS].clone()
        lprobs.fill_(-math.inf)
        lprobs[:, EOS] = eos_lp
        return lprobs
    if bool(forced.any()):
        idx = forced.nonzero().flatten()
        want = rows.prefix[idx, step]
        keep = lprobs[idx].gather(1, want[:, None])
        lprobs[idx] = -math.inf
        lprobs[idx] = lprobs[idx].scatter(1, want[:, None], keep)
    if step < cfg.min_len:
        lprobs[:, EOS] = torch.where(free, torch.full_like(lprobs[:, EOS], -math.inf), lprobs[:, EOS])
    if cfg.no_repeat_ngram_size > 0:
        ngram = cfg.no_repeat_ngram_size
        for r in free.nonzero().flatten().tolist():
            banned = _banned_ngram_tokens(tokens[r, :step + 1].tolist(), ngram)
            if banned:
                lprobs[r, banned] = -math.inf
    return lprobs


# ------------------------------------------------------------------------------------------- searches
def _finish(tokens_row: torch.Tensor, step: int, cum_scores_row: torch.Tensor, final_score: float,
            cfg: GenerationConfig) -> Hypothesis:
    """Hypothesis ending with eos at position step+1 (cum_scores_row[:step] are the cumulative scores before)."""
    toks = torch.cat([tokens_row[1:step + 1], tokens_row.new_tensor([EOS])])
    cum = torch.cat([cum_scores_row[:step], cum_scores_row.new_tensor([final_score])])
    positional = cum - torch.cat([cum.new_zeros(1), cum[:-1]])
    score = final_score if cfg.unnormalized else final_score / (step + 1) ** cfg.lenpen
    return Hypothesis(toks.cpu(), float(score), positional.cpu())


def _beam_search(stepper: _Stepper, rows: _Rows, bsz: int, cfg: GenerationConfig, max_len: int,
                 device: torch.device, lockstep: Callable[[bool], bool] | None) -> list[list[Hypothesis]]:
    beam = cfg.beam_size
    tokens = torch.full((bsz * beam, max_len + 2), PAD, dtype=torch.long, device=device)
    tokens[:, 0] = BOS
    scores = torch.zeros(bsz * beam, max_len + 1, device=device)
    finalized: list[list[Hypothesis]] = [[] for _ in range(bsz)]
    active = list(range(bsz))  # original sentence index of each sentence still decoding
    for step in range(max_len + 1):
        lprobs = next_token_lprobs(stepper.logits(tokens[:, :step + 1]), tokens, step, rows, cfg, max_len)
        n, vocab = len(active), lprobs.shape[1]
        lp = lprobs.view(n, beam, vocab)
        cum = lp[:, :1] if step == 0 else lp + scores[:, step - 1].view(n, beam, 1)
        flat = cum.reshape(n, -1)
        cand_scores, cand_idx = flat.topk(min(2 * beam, flat.shape[1]), dim=1)
        cand_beams, cand_tokens = cand_idx // vocab, cand_idx % vocab
        is_eos = cand_tokens.eq(EOS) & torch.isfinite(cand_scores)
        for s, j in is_eos[:, :beam].nonzero().tolist():
            sent = active[s]
            if len(finalized[sent]) < beam:
                row = s * beam + int(cand_beams[s, j])
                finalized[sent].append(_finish(tokens[row], step, scores[row], float(cand_scores[s, j]), cfg))
        if step == max_len:
            break
        keep, order, new_tokens, new_scores = [], [], [], []
        for s in range(n):
            if len(finalized[active[s]]) >= beam:
                continue
            picks = (~is_eos[s]).nonzero().flatten()[:beam]
            keep.append(s)
            order.append(s * beam + cand_beams[s, picks])
            new_tokens.append(cand_tokens[s, picks])
            new_scores.append(cand_scores[s, picks])
        if not keep:
            break
        order_t = torch.cat(order)
        tokens = tokens.index_select(0, order_t)
        scores = scores.index_select(0, order_t)
        tokens[:, step + 1] = torch.cat(new_tokens)
        scores[:, step] = torch.cat(new_scores)
        stepper.reorder(order_t)
        rows.reorder(order_t)
        active = [active[s] for s in keep]
        if lockstep is not None:
            lockstep(False)  # this rank steps on; the call keeps every rank's collectives in order
    stepper.idle(tokens[:, :step + 1], lockstep)
    return finalized


def _independent_rows(stepper: _Stepper, rows: _Rows, bsz: int, per_sample: int, cfg: GenerationConfig,
                      max_len: int, device: torch.device, generator: torch.Generator | None,
                      lockstep: Callable[[bool], bool] | None) -> list[list[Hypothesis]]:
    """Greedy (argmax) or sampling: each of bsz·per_sample rows decodes on its own until eos."""
    total = bsz * per_sample
    tokens = torch.full((total, max_len + 2), PAD, dtype=torch.long, device=device)
    tokens[:, 0] = BOS
    scores = torch.zeros(total, max_len + 1, device=device)
    out: list[list[Hypothesis]] = [[] for _ in range(bsz)]
    alive = list(range(total))  # original row index
    for step in range(max_len + 1):
        lprobs = next_token_lprobs(stepper.logits(tokens[:, :step + 1]), tokens, step, rows, cfg, max_len)
        dead = ~torch.isfinite(lprobs.max(dim=1).values)
        if cfg.sampling:
            safe = lprobs.masked_fill(dead[:, None], 0.0)  # keeps multinomial valid; dead rows are dropped below
            if 0 < cfg.sampling_topk < safe.shape[1]:
                top_lp, top_idx = safe.topk(cfg.sampling_topk, dim=1)
                pick = torch.multinomial(top_lp.exp(), 1, generator=generator)
                tok = top_idx.gather(1, pick).squeeze(1)
            else:
                tok = torch.multinomial(safe.exp(), 1, generator=generator).squeeze(1)
            step_lp = lprobs.gather(1, tok[:, None]).squeeze(1)
        else:
            step_lp, tok = lprobs.max(dim=1)
        cum = step_lp + (scores[:, step - 1] if step > 0 else 0.0)
        ended = tok.eq(EOS) & ~dead
        for r in ended.nonzero().flatten().tolist():
            out[alive[r] // per_sample].append(_finish(tokens[r], step, scores[r], float(cum[r]), cfg))
        if step == max_len:
            break
        keep = (~ended & ~dead).nonzero().flatten()
        if keep.numel() == 0:
            break
        tokens = tokens.index_select(0, keep)
        scores = scores.index_select(0, keep)
        tokens[:, step + 1] = tok.index_select(0, keep)
        scores[:, step] = cum.index_select(0, keep)
        stepper.reorder(keep)
        rows.reorder(keep)
        alive = [alive[i] for i in keep.tolist()]
        if lockstep is not None:
            lockstep(False)
    stepper.idle(tokens[:, :step + 1], lockstep)
    return out


# ------------------------------------------------------------------------------------------- public API
def _prefix_rows(prefix_tokens, bsz: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if prefix_tokens is None:
        return torch.full((bsz, 1), PAD, dtype=torch.long, device=device), torch.zeros(bsz, dtype=torch.long,
                                                                                       device=device)
    if isinstance(prefix_tokens, torch.Tensor):
        seqs = [row[row.ne(PAD)].tolist() for row in prefix_tokens]
    else:
        seqs = [list(map(int, p)) for p in prefix_tokens]
    if len(seqs) != bsz:
        raise ValueError(f"prefix_tokens has {len(seqs)} rows for a batch of {bsz}")
    width = max(1, max(len(s) for s in seqs))
    prefix = torch.full((bsz, width), PAD, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if s:
            prefix[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return prefix, torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)


def max_generation_len(model, cfg: GenerationConfig, src_len: int, code_mode: bool) -> int:
    """min(a·src_len + b, cap): the cap keeps bos + max_len + 1 inputs inside the decoder's position tables."""
    limit = int(cfg.max_len_a * src_len + cfg.max_len_b)
    config = getattr(model, "config", None)
    if config is not None:
        limit = min(limit, config.max_target_positions)
        if code_mode:
            limit = min(limit, model.decoder.image_position_idx.numel() - 1)
    if cfg.max_len is not None:
        limit = min(limit, cfg.max_len)
    return max(limit, 0)


@torch.no_grad()
def generate(
    model,
    batch: Mapping[str, torch.Tensor],
    cfg: GenerationConfig | None = None,
    *,
    prefix_tokens: Sequence[Sequence[int]] | torch.Tensor | None = None,
    constraint_trie: Trie | Sequence[Trie | None] | None = None,
    generator: torch.Generator | None = None,
    lockstep: Callable[[bool], bool] | None = None,
) -> list[list[Hypothesis]]:
    """Decode a batch (`src_tokens`, optional `patch_images`, `patch_masks`, `code_masks`).

    Returns, per sample, its hypotheses sorted by score (best first; `cfg.nbest` of them). `prefix_tokens`:
    per-sample forced tokens after bos (a list of lists, or a pad-padded tensor). `constraint_trie`: one trie for
    all samples or one per sample (None = unconstrained). Put the model in eval mode first.

    `lockstep(done) -> every rank is done` (distributed evaluation, e.g. `lambda done: not
    collectives.any_rank(not done)`) is called once per decoder step; a rank whose rows have all finished keeps
    stepping a dummy row until every rank has, so all ranks run the same number of forwards (an empty batch
    included: it decodes a placeholder sample and returns []).
    """
    cfg = cfg or GenerationConfig()
    cfg.validate()
    src = batch["src_tokens"]
    if src.shape[0] == 0:
        if lockstep is None:
            return []
        generate(model, _placeholder_batch(batch), cfg, generator=generator, lockstep=lockstep)
        return []
    bsz, device = src.shape[0], src.device
    code_masks = batch.get("code_masks")
    code_mode = code_masks is not None and bool(code_masks.any())
    max_len = max_generation_len(model, cfg, src.shape[1], code_mode)
    per_sample = 1 if cfg.greedy else cfg.beam_size
    prefix, prefix_len = _prefix_rows(prefix_tokens, bsz, device)
    if isinstance(constraint_trie, Trie) or constraint_trie is None:
        tries = None if constraint_trie is None else [constraint_trie] * bsz
    else:
        tries = list(constraint_trie)
        if len(tries) != bsz:
            raise ValueError(f"got {len(tries)} constraint tries for a batch of {bsz}")
        if all(t is None for t in tries):
            tries = None

    encoder_out = encode(model, batch)
    order = torch.arange(bsz, device=device).repeat_interleave(per_sample)
    if per_sample > 1:
        encoder_out = _reorder_encoder_out(model, encoder_out, order)
        code_masks = None if code_masks is None else code_masks.index_select(0, order)
    stepper = _Stepper(model, encoder_out, code_masks, cfg.use_cache)
    # MuE early exit (model/early_exit.py): a sample's rows decide jointly; the step schedule needs max_len
    early_exit.start_decoding(model, stepper.state, groups=order, max_len=max_len)
    rows = _Rows(prefix.index_select(0, order), prefix_len.index_select(0, order),
                 None if tries is None else [tries[i] for i in order.tolist()])
    if cfg.greedy or cfg.sampling:
        results = _independent_rows(stepper, rows, bsz, per_sample, cfg, max_len, device, generator, lockstep)
    else:
        results = _beam_search(stepper, rows, bsz, cfg, max_len, device, lockstep)
    nbest = cfg.nbest or per_sample
    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in results]


def _prompts(decoder_prompts, bsz: int) -> list[list[int]]:
    prompts = [[BOS]] * bsz if decoder_prompts is None else [list(map(int, p)) for p in decoder_prompts]
    if len(prompts) != bsz or any(not p or p[0] != BOS for p in prompts):
        raise ValueError("decoder_prompts needs one prompt per sample, each starting with bos")
    return prompts


def _candidate_inputs(batch, candidates, decoder_prompts, constraint_trie, constrain, lockstep):
    """Shared set-up of both scorers -> (batch, prompts, candidates, trie or None); batch None: nothing to run.
    An empty batch under a lockstep becomes one placeholder sample, since the other ranks' passes wait on it."""
    bsz = batch["src_tokens"].shape[0]
    prompts = _prompts(decoder_prompts, bsz)
    cands = [list(map(int, c)) for c in candidates]
    if bsz == 0:
        if lockstep is None:
            return None, prompts, cands, None
        batch, prompts = _placeholder_batch(batch), [[BOS]]
    if constrain and constraint_trie is None:
        constraint_trie = Trie.from_answers(cands, bos=BOS, eos=EOS)
    return batch, prompts, cands, constraint_trie if constrain else None


def _placeholder_batch(batch: Mapping[str, torch.Tensor]) -> dict:
    """One all-bos sample shaped like `batch` (which has none), for a rank that must still run its forwards."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.new_ones((1, *value.shape[1:])) if key == "patch_masks" else \
                value.new_zeros((1, *value.shape[1:]))
        else:
            out[key] = value
    return out


@torch.no_grad()
def score_candidates(
    model,
    batch: Mapping[str, torch.Tensor],
    candidates: Sequence[Sequence[int]],
    *,
    decoder_prompts: Sequence[Sequence[int]] | None = None,
    constraint_trie: Trie | None = None,
    constrain: bool = True,
    chunk_size: int = 20,
    lockstep: Callable[[bool], bool] | None = None,
    rows_per_pass: int = 4096,
) -> torch.Tensor:
    """All-candidate inference (spec §6.3) -> (B, C) scores; prediction = argmax over candidates.

    Each candidate (answer token ids, no bos/eos) is scored as if teacher-forced after the sample's decoder prompt
    (default `[bos]`; a prompt starts with bos): decoder input = prompt + answer, targets = prompt[1:] + answer +
    eos. With `constrain`, logits at answer position k are masked to `trie.get_next_layer([bos] + answer[:k])`
    (the trie defaults to one built from `candidates`), then log-softmax; the score is the **sum** of the answer
    and eos log-probs (no length normalisation). Prompt positions do not count.

    The prompt runs through the decoder once and every shared answer prefix is computed once
    (`model.candidates`, at most `rows_per_pass` query rows per pass); code-mode batches take OFA's way
    (`score_candidates_naive`, `chunk_size` rows per pass). `lockstep` (distributed evaluation): every rank runs
    the same number of decoder passes, an empty batch included.
    """
    code_masks = batch.get("code_masks")
    exits = early_exit.config_of(model)  # MuE decoder exits live in the decoder's own loop, which the tree bypasses
    if (code_masks is not None and bool(code_masks.any())) or (exits is not None and exits.decoder < 1.0):
        return score_candidates_naive(model, batch, candidates, decoder_prompts=decoder_prompts,
                                      constraint_trie=constraint_trie, constrain=constrain, chunk_size=chunk_size,
                                      lockstep=lockstep)
    bsz = batch["src_tokens"].shape[0]
    batch, prompts, cands, trie = _candidate_inputs(batch, candidates, decoder_prompts, constraint_trie, constrain,
                                                    lockstep)
    if batch is None:
        return torch.zeros(0, len(cands))
    scores = score_tree(model.decoder, encode(model, batch), prompts, cands, trie, bos=BOS, eos=EOS, pad=PAD,
                        rows_per_pass=rows_per_pass, lockstep=lockstep)
    return scores[:bsz]


@torch.no_grad()
def score_candidates_naive(
    model,
    batch: Mapping[str, torch.Tensor],
    candidates: Sequence[Sequence[int]],
    *,
    decoder_prompts: Sequence[Sequence[int]] | None = None,
    constraint_trie: Trie | None = None,
    constrain: bool = True,
    chunk_size: int = 20,
    lockstep: Callable[[bool], bool] | None = None,
) -> torch.Tensor:
    """`score_candidates` the way OFA does it (the reference for tests and benchmarks/allcand.py): the encoder
    output is shared, but every (sample, candidate) row re-runs the decoder over prompt + answer, `chunk_size`
    rows per pass, with full-vocabulary logits at every position."""
    bsz, device = batch["src_tokens"].shape[0], batch["src_tokens"].device
    batch, prompts, cands, trie = _candidate_inputs(batch, candidates, decoder_prompts, constraint_trie, constrain,
                                                    lockstep)
    if batch is None:
        return torch.zeros(0, len(cands))
    encoder_out = encode(model, batch)
    code_masks = batch.get("code_masks")
    pairs = [(b, c) for b in range(len(prompts)) for c in range(len(cands))]
    scores = torch.full((len(prompts), len(cands)), -math.inf)
    masks: dict[int, torch.Tensor] = {}  # per candidate, built once (OFA precomputes them when the task loads)

    def run(chunk: list[tuple[int, int]], record: bool = True) -> None:
        inputs = [prompts[b] + cands[c] for b, c in chunk]
        width = max(len(x) for x in inputs)
        prev = torch.full((len(chunk), width), PAD, dtype=torch.long)
        target = torch.full((len(chunk), width), PAD, dtype=torch.long)
        allowed = None if trie is None else torch.ones(len(chunk), width, model_vocab(model), dtype=torch.bool)
        for i, ((b, c), x) in enumerate(zip(chunk, inputs)):
            prev[i, :len(x)] = torch.tensor(x)
            tgt = x[1:] + [EOS]
            p = len(prompts[b])
            target[i, p - 1:len(x)] = torch.tensor(tgt[p - 1:])  # prompt positions stay pad = ignored
            if trie is not None:
                if c not in masks:
                    masks[c] = trie.answer_masks(cands[c], allowed.shape[2], bos=BOS)
                allowed[i, p - 1:len(x)] = masks[c]
        order = torch.tensor([b for b, _ in chunk], device=device)
        enc = _reorder_encoder_out(model, encoder_out, order)
        cm = None if code_masks is None else code_masks.index_select(0, order)
        logits = model.decoder(prev.to(device), enc, code_masks=cm).float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(device), -math.inf)
        lprobs = F.log_softmax(logits, dim=-1)
        target = target.to(device)
        picked = lprobs.gather(2, target.clamp(min=0)[:, :, None]).squeeze(2)
        picked = picked.masked_fill(target.eq(PAD), 0.0)
        totals = picked.sum(dim=1).cpu()
        if record:
            for i, (b, c) in enumerate(chunk):
                scores[b, c] = totals[i]

    chunks = [pairs[start:start + chunk_size] for start in range(0, len(pairs), chunk_size)]
    run_in_lockstep([lambda chunk=chunk: run(chunk) for chunk in chunks],
                    lambda: run(pairs[:1], record=False), lockstep)
    return scores[:bsz]


def model_vocab(model) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        return int(config.vocab_size)
    return int(model.decoder.embed_tokens.weight.shape[0])


__all__ = ["GenerationConfig", "Hypothesis", "generate", "score_candidates", "score_candidates_naive",
           "next_token_lprobs", "max_generation_len", "encode"]

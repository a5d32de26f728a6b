"""Generation on the tiny preset with random weights (fp32): KV cache, beam search, constraints, sampling.

Some tests bias the final decoder LayerNorm towards one token's embedding, so that token is (nearly) always the
argmax; that makes the behaviour a knob must prevent (early eos, repeated n-grams) happen without the knob, and
each test first checks it does.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ofa_scale.errors import ConfigError
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.generate import EOS, PAD, GenerationConfig, generate, score_candidates
from ofa_scale.utils.trie import Trie

BOS = 0
CODE_START, CODE_END = 50265, 58457
BIN_START, BIN_END = 58457, 59457


@pytest.fixture(scope="module")
def model() -> OFAModel:
    torch.manual_seed(0)
    return OFAModel(OFAConfig.preset("ofa_tiny", attention_impl="math")).eval()


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(5)
    return dict(src_tokens=torch.tensor([[0, 11, 12, 13, 14, 2], [0, 21, 22, 2, PAD, PAD]]),
                patch_images=torch.randn(2, 3, 32, 32, generator=g), patch_masks=torch.tensor([True, False]))


class biased_towards:
    """Temporarily add c·E[token]/|E[token]| to the decoder's final LN bias (token becomes the argmax)."""

    def __init__(self, model, token: int, strength: float = 30.0):
        self.model, self.token, self.strength = model, token, strength

    def __enter__(self):
        ln = self.model.decoder.layer_norm
        self.saved = ln.bias.detach().clone()
        e = self.model.encoder.embed_tokens.weight[self.token].detach()
        with torch.no_grad():
            ln.bias.add_(self.strength * e / e.norm())
        return self.model

    def __exit__(self, *exc):
        with torch.no_grad():
            self.model.decoder.layer_norm.bias.copy_(self.saved)


def teacher_forced_lprobs(model, batch, b: int, tokens: list[int], code_mask: bool = False) -> torch.Tensor:
    """log_softmax of the full (uncached) forward for sample b fed [bos] + tokens[:-1] -> (len(tokens), V)."""
    one = {k: (v[b:b + 1] if v is not None else None) for k, v in batch.items()}
    prev = torch.tensor([[BOS] + tokens[:-1]])
    with torch.no_grad():
        logits = model(src_tokens=one["src_tokens"], patch_images=one["patch_images"],
                       patch_masks=one["patch_masks"], prev_output_tokens=prev,
                       code_masks=torch.tensor([code_mask]) if code_mask else None)
    return F.log_softmax(logits[0].float(), dim=-1)


# ------------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("code_mode", [False, True])
def test_cached_decoding_equals_full_recomputation_step_by_step(model, batch, code_mode):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(4, 50000, (2, 9), generator=g)
    tokens[:, 0] = BOS
    code_masks = torch.tensor([True, False]) if code_mode else None
    with torch.no_grad():
        enc = model.encoder(src_tokens=batch["src_tokens"], patch_images=batch["patch_images"],
                            patch_masks=batch["patch_masks"])
        state: dict = {}
        for t in range(1, 10):
            if t == 5:  # beam reorder mid-way: swap the rows in the cache, the tokens and the encoder output
                order = torch.tensor([1, 0])
                model.decoder.reorder_incremental_state(state, order)
                enc = enc.index_select(order)
                tokens = tokens.index_select(0, order)
                code_masks = None if code_masks is None else code_masks.index_select(0, order)
            cached = model.decoder(tokens[:, :t], enc, code_masks=code_masks, incremental_state=state)
            full = model.decoder(tokens[:, :t], enc, code_masks=code_masks)
            assert cached.shape[1] == 1  # only the newest position was computed
            torch.testing.assert_close(cached[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_generate_with_cache_equals_without(model, batch):
    cfg = dict(beam_size=3, max_len_b=6, no_repeat_ngram_size=2)
    with_cache = generate(model, batch, GenerationConfig(**cfg))
    without = generate(model, batch, GenerationConfig(**cfg, use_cache=False))
    for a, b in zip(with_cache, without):
        assert [h.tokens.tolist() for h in a] == [h.tokens.tolist() for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


# ------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("lenpen", [1.0, 0.5])
def test_beam_one_equals_greedy(model, batch, lenpen):
    kw = dict(max_len_b=7, lenpen=lenpen)
    beam = generate(model, batch, GenerationConfig(beam_size=1, **kw), prefix_tokens=[[5, 6], []])
    greedy = generate(model, batch, GenerationConfig(greedy=True, **kw), prefix_tokens=[[5, 6], []])
    for a, b in zip(beam, greedy):
        assert len(a) == len(b) == 1
        assert a[0].tokens.tolist() == b[0].tokens.tolist()
        assert a[0].score == pytest.approx(b[0].score, abs=1e-5)
    with biased_towards(model, EOS, strength=6.0):  # eos competes: one sample stops early, one runs to max
        beam = generate(model, batch, GenerationConfig(beam_size=1, **kw))
        greedy = generate(model, batch, GenerationConfig(greedy=True, **kw))
    assert [h[0].tokens.tolist() for h in beam] == [h[0].tokens.tolist() for h in greedy]
    assert len({len(h[0].tokens) for h in greedy}) > 1


@pytest.mark.parametrize("lenpen,unnormalized", [(1.0, False), (0.7, False), (1.0, True)])
def test_beam_scores_are_teacher_forced_log_prob_sums(model, batch, lenpen, unnormalized):
    with biased_towards(model, EOS, strength=6.0):  # finished hypotheses of different lengths
        hyps = generate(model, batch, GenerationConfig(beam_size=4, max_len_b=6, lenpen=lenpen,
                                                       unnormalized=unnormalized))
        assert len({len(h.tokens) for ps in hyps for h in ps}) > 2
        for b, per_sample in enumerate(hyps):
            assert len(per_sample) == 4
            assert [h.score for h in per_sample] == sorted((h.score for h in per_sample), reverse=True)
            for h in per_sample:
                toks = h.tokens.tolist()
                assert toks[-1] == EOS and EOS not in toks[:-1] and len(toks) <= 7
                lp = teacher_forced_lprobs(model, batch, b, toks)
                positional = lp[torch.arange(len(toks)), torch.tensor(toks)]
                torch.testing.assert_close(h.positional_scores, positional, rtol=1e-4, atol=1e-4)
                norm = 1.0 if unnormalized else len(toks) ** lenpen
                assert h.score == pytest.approx(positional.sum().item() / norm, abs=1e-3)


def test_max_len_follows_a_and_b(model, batch):
    src_len = batch["src_tokens"].shape[1]
    hyps = generate(model, batch, GenerationConfig(greedy=True, max_len_a=0.5, max_len_b=1))
    limit = int(0.5 * src_len + 1)
    for per_sample in hyps:
        assert len(per_sample[0].tokens) <= limit + 1
    with biased_towards(model, 100):  # never chooses eos on its own: stops exactly at the limit
        hyps = generate(model, batch, GenerationConfig(beam_size=2, max_len_b=5))
    assert all(len(h.tokens) == 6 and h.tokens[-1] == EOS for ps in hyps for h in ps)


def test_min_len_is_honoured(model, batch):
    with biased_towards(model, EOS):
        eager = generate(model, batch, GenerationConfig(greedy=True, max_len_b=8, min_len=0))
        assert all(ps[0].tokens.tolist() == [EOS] for ps in eager)  # without min_len it stops at once
        for cfg in (GenerationConfig(greedy=True, max_len_b=8, min_len=4),
                    GenerationConfig(beam_size=3, max_len_b=8, min_len=4)):
            for ps in generate(model, batch, cfg):
                for h in ps:
                    assert len(h.tokens) >= 5 and h.tokens[-1] == EOS and EOS not in h.tokens[:-1].tolist()


def _has_repeated_ngram(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_is_honoured(model, batch, n):
    with biased_towards(model, 100):
        free = generate(model, batch, GenerationConfig(greedy=True, max_len_b=8))
        assert all(_has_repeated_ngram(ps[0].tokens.tolist(), n) for ps in free)  # repeats without the knob
        for cfg in (GenerationConfig(greedy=True, max_len_b=8, no_repeat_ngram_size=n),
                    GenerationConfig(beam_size=3, max_len_b=8, no_repeat_ngram_size=n)):
            for ps in generate(model, batch, cfg):
                for h in ps:
                    assert not _has_repeated_ngram([BOS] + h.tokens.tolist(), n)


def test_prefix_tokens_are_kept_per_sample(model, batch):
    prefixes = [[101, 102, 103], [104]]
    for cfg in (GenerationConfig(beam_size=3, max_len_b=6, min_len=1), GenerationConfig(greedy=True, max_len_b=6),
                GenerationConfig(sampling=True, sampling_topk=5, beam_size=2, max_len_b=6)):
        hyps = generate(model, batch, cfg, prefix_tokens=prefixes, generator=torch.Generator().manual_seed(0))
        for prefix, ps in zip(prefixes, hyps):
            assert ps
            for h in ps:
                assert h.tokens[:len(prefix)].tolist() == prefix
    padded = torch.tensor([[101, 102, 103], [104, PAD, PAD]])  # tensor form, pad-padded
    a = generate(model, batch, GenerationConfig(greedy=True, max_len_b=6), prefix_tokens=padded)
    b = generate(model, batch, GenerationConfig(greedy=True, max_len_b=6), prefix_tokens=prefixes)
    assert [p[0].tokens.tolist() for p in a] == [p[0].tokens.tolist() for p in b]


# ------------------------------------------------------------------------------------------ constraints
ANSWERS = [[500, 501], [500, 502, 503], [600], [700, 701, 702, 703]]


@pytest.mark.parametrize("mode", ["beam", "greedy", "sampling"])
def test_trie_constraints_are_never_violated(model, batch, mode):
    trie = Trie.from_answers(ANSWERS, bos=BOS, eos=EOS)
    prefixes = [[40, 41], []]  # decoder prompts are forced, the trie applies after them
    cfg = {"beam": GenerationConfig(beam_size=4, max_len_b=10),
           "greedy": GenerationConfig(greedy=True, max_len_b=10),
           "sampling": GenerationConfig(sampling=True, beam_size=6, max_len_b=10)}[mode]
    with biased_towards(model, 100):  # the unconstrained choice would be 100 every step
        hyps = generate(model, batch, cfg, prefix_tokens=prefixes, constraint_trie=trie,
                        generator=torch.Generator().manual_seed(1))
    answers = {tuple(a) for a in ANSWERS}
    for prefix, ps in zip(prefixes, hyps):
        assert ps
        for h in ps:
            toks = h.tokens.tolist()
            assert toks[:len(prefix)] == prefix and toks[-1] == EOS
            assert tuple(toks[len(prefix):-1]) in answers
    if mode == "beam":  # four answers, four beams: every answer is found for each sample
        assert all({tuple(h.tokens.tolist()[len(p):-1]) for h in ps} == answers for p, ps in zip(prefixes, hyps))


def test_trie_beam_scores_equal_all_candidate_scores(model, batch):
    """Two independent paths: unnormalised trie-constrained beam search over a closed answer set (beam >= answers)
    finds every answer with exactly its all-candidate score."""
    trie = Trie.from_answers(ANSWERS, bos=BOS, eos=EOS)
    hyps = generate(model, batch, GenerationConfig(beam_size=4, max_len_b=10, unnormalized=True),
                    constraint_trie=trie)
    allcand = score_candidates(model, batch, ANSWERS)
    for b, ps in enumerate(hyps):
        found = {tuple(h.tokens.tolist()[:-1]): h.score for h in ps}
        for c, answer in enumerate(ANSWERS):
            assert found[tuple(answer)] == pytest.approx(allcand[b, c].item(), abs=1e-4)
        assert max(found, key=found.get) == tuple(ANSWERS[int(allcand[b].argmax())])


def test_per_sample_tries(model, batch):
    tries = [Trie.from_answers([[500]], bos=BOS, eos=EOS), None]
    with biased_towards(model, 100):
        hyps = generate(model, batch, GenerationConfig(greedy=True, max_len_b=4), constraint_trie=tries)
    assert hyps[0][0].tokens.tolist() == [500, EOS]
    assert hyps[1][0].tokens.tolist()[:4] == [100, 100, 100, 100]


def test_code_range_generation_emits_exactly_max_len_codes(model, batch):
    cfg = GenerationConfig(sampling=True, sampling_topk=256, beam_size=3, min_len=12, max_len_b=12,
                           constraint_range=(CODE_START, CODE_END))
    coded = dict(batch, code_masks=torch.tensor([True, True]))
    with biased_towards(model, EOS, strength=50.0):  # eos (and other specials) would win if they were allowed
        hyps = generate(model, coded, cfg, generator=torch.Generator().manual_seed(0))
    for ps in hyps:
        assert len(ps) == 3
        for h in ps:
            toks = h.tokens.tolist()
            assert len(toks) == 13 and toks[-1] == EOS
            assert all(CODE_START <= t < CODE_END for t in toks[:-1])


def test_bin_range_beam_search(model, batch):
    cfg = GenerationConfig(beam_size=5, min_len=4, max_len_b=4, constraint_range=(BIN_START, BIN_END))
    with biased_towards(model, 100):
        hyps = generate(model, batch, cfg)
    for ps in hyps:
        for h in ps:
            toks = h.tokens.tolist()
            assert len(toks) == 5 and toks[-1] == EOS and all(BIN_START <= t < BIN_END for t in toks[:-1])


# ------------------------------------------------------------------------------------------ sampling
def test_topk_sampling_is_seeded_and_stays_in_the_top_k(model, batch):
    k, temperature = 8, 0.7
    cfg = GenerationConfig(sampling=True, sampling_topk=k, temperature=temperature, beam_size=3, max_len_b=6)
    run = lambda seed: generate(model, batch, cfg, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = run(11), run(11), run(12)
    as_lists = lambda hs: [[h.tokens.tolist() for h in ps] for ps in hs]  # noqa: E731
    assert as_lists(first) == as_lists(again)
    assert as_lists(first) != as_lists(other)
    for b, ps in enumerate(first):
        assert len(ps) == 3
        for h in ps:
            toks = h.tokens.tolist()
            raw = teacher_forced_lprobs(model, batch, b, toks)
            lp = raw.clone()
            lp[:, [PAD, BOS]] = -math.inf  # never generated
            for t, tok in enumerate(toks):
                if tok == EOS and t == len(toks) - 1 and len(toks) == 7:
                    continue  # forced at max length
                assert int((lp[t] > lp[t, tok]).sum()) < k
            # the recorded scores are the tempered log-probs of the sampled tokens
            tempered = F.log_softmax(raw / temperature, dim=-1)
            assert h.positional_scores.tolist() == pytest.approx(
                tempered[torch.arange(len(toks)), torch.tensor(toks)].tolist(), abs=1e-4)


# ------------------------------------------------------------------------------------------ all-candidate
def test_score_candidates_matches_manual_constrained_sum(model, batch):
    cands = [[500, 501], [500, 502, 503], [600]]
    prompts = [[BOS, 40, 41], [BOS]]
    scores = score_candidates(model, batch, cands, decoder_prompts=prompts, chunk_size=4)
    free = score_candidates(model, batch, cands, decoder_prompts=prompts, constrain=False)
    assert scores.shape == (2, 3)
    trie = Trie.from_answers(cands, bos=BOS, eos=EOS)
    vocab = model.config.vocab_size
    for b in range(2):
        p = prompts[b]
        for c, cand in enumerate(cands):
            toks = p[1:] + cand + [EOS]  # teacher-forced targets after bos
            one = {k: v[b:b + 1] for k, v in batch.items()}
            with torch.no_grad():
                logits = model(prev_output_tokens=torch.tensor([p + cand]), **one)[0]
            masks = trie.answer_masks(cand, vocab, bos=BOS)
            answer_pos = torch.arange(len(p) - 1, len(p) + len(cand))
            masked = logits[answer_pos].masked_fill(~masks, -math.inf)
            want = F.log_softmax(masked, -1)[torch.arange(len(cand) + 1), torch.tensor(toks[len(p) - 1:])].sum()
            assert scores[b, c].item() == pytest.approx(want.item(), abs=1e-4)
            plain = F.log_softmax(logits[answer_pos], -1)[torch.arange(len(cand) + 1),
                                                          torch.tensor(toks[len(p) - 1:])].sum()
            assert free[b, c].item() == pytest.approx(plain.item(), abs=1e-4)
            assert scores[b, c] >= free[b, c]  # renormalising over the allowed set only raises log-probs


def test_generation_config_is_validated():
    with pytest.raises(ConfigError):
        GenerationConfig(beam_size=0).validate()
    with pytest.raises(ConfigError):
        GenerationConfig(greedy=True, sampling=True).validate()
    with pytest.raises(ConfigError):
        GenerationConfig(constraint_range=(10, 5)).validate()


def test_task_presets_and_ofa_eval_args():
    cfg = GenerationConfig.from_ofa_args({"beam": 24, "min_len": 1024, "max_len_a": 0, "max_len_b": 1024,
                                          "sampling_topk": 256, "temperature": 1.0})
    assert cfg.sampling and cfg.beam_size == 24 and cfg.sampling_topk == 256
    assert GenerationConfig.for_task("image_gen", max_len_b=8).max_len_b == 8
    with pytest.raises(ConfigError, match="unknown OFA generation argument"):
        GenerationConfig.from_ofa_args({"beam": 5, "bogus": 1})
    with pytest.raises(ConfigError, match="no decoding preset"):
        GenerationConfig.for_task("translation")


def test_uint8_images_are_normalised_like_the_training_batches(model, batch):
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    as_uint8 = generate(model, dict(batch, patch_images=raw), GenerationConfig(greedy=True, max_len_b=5))
    as_float = generate(model, dict(batch, patch_images=(raw.float() / 255 - 0.5) / 0.5),
                        GenerationConfig(greedy=True, max_len_b=5))
    assert [p[0].tokens.tolist() for p in as_uint8] == [p[0].tokens.tolist() for p in as_float]
    assert [p[0].score for p in as_uint8] == pytest.approx([p[0].score for p in as_float], abs=1e-6)

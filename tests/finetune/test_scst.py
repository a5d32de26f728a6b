"""SCST (caption stage 2, spec §6.2): the baseline and loss on hand-made numbers, the direction of one update on a
tiny model (the best-rewarded hypothesis gains probability, the worst loses it), the CIDEr-D reward, and 2 ranks
under ZeRO-3 whose captions end at different lengths finishing without a hang, equal to one process.
(CIDEr-D against pycocoevalcap's on the same inputs: tests/evaluation/test_caption_metrics.py.)"""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ofa_scale.evaluation.metrics.cider import DocumentFrequencies
from ofa_scale.evaluation.metrics.caption_text import scst_sentence
from ofa_scale.finetune.freeze import apply_freezing
from ofa_scale.finetune.scst import (CiderReward, Rollout, ScstSettings, advantages, hypothesis_tensors,
                                     run_scst_step, scst_loss)
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.generate import GenerationConfig
from ofa_scale.objectives.token_loss import SingleProcessTokenLoss
from ofa_scale.training.metrics import TaskAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import parallel_launch  # noqa: E402
from test_step_loss import FakeEngine  # noqa: E402

WORKER = Path(__file__).with_name("finetune_workers.py")
V, PAD, BOS, EOS = 64, 1, 0, 2


def test_baseline_is_the_mean_of_the_other_hypotheses():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    want = [1 - 3.5, 2 - 13 / 4, 3 - 3.0, 4 - 11 / 4, 5 - 2.5]
    assert advantages(scores).tolist() == pytest.approx(want)
    assert advantages(torch.tensor([7.0])).tolist() == [0.0]  # a lone hypothesis has no baseline to beat


def test_loss_sign_and_normalisation_hand_made():
    prev, target = hypothesis_tensors([torch.tensor([5, 6, EOS]), torch.tensor([7, EOS])])
    assert prev.tolist() == [[BOS, 5, 6], [BOS, 7, PAD]]
    assert target.tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ro = Rollout(rows=torch.tensor([0, 0]), prev=prev, target=target, advantage=torch.tensor([0.5, -2.0]),
                 scores=[1.0, 2.0], images=1)
    assert ro.tokens == 5
    loss, _ = scst_loss(SingleProcessTokenLoss(0.0, PAD), logits, ro, denominator=8.0)
    lp = torch.log_softmax(logits.detach(), -1)
    want = -(0.5 * (lp[0, 0, 5] + lp[0, 1, 6] + lp[0, 2, EOS]) - 2.0 * (lp[1, 0, 7] + lp[1, 1, EOS])) / 8.0
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    loss.backward()
    # descending the loss raises the positive-advantage tokens' logits and lowers the negative one's
    assert logits.grad[0, 0, 5] < 0 and logits.grad[1, 0, 7] > 0
    assert torch.equal(logits.grad[1, 2], torch.zeros(10))  # padding position: no gradient


def test_cider_reward_scores_a_matching_caption_higher():
    refs = ["a dog runs on the grass", "a brown dog running"]
    df = DocumentFrequencies.from_references([[scst_sentence(r) for r in refs],
                                              [scst_sentence("a cat sleeps")]])
    scores = CiderReward(df)(["a dog runs on the grass.", "a cat sleeps", "a dog running"], refs)
    assert scores[0] > scores[2] > scores[1] >= 0.0


# ---- one update on a tiny model -----------------------------------------------------------------------------
def tiny_model() -> OFAModel:
    torch.manual_seed(0)
    return OFAModel(OFAConfig.preset("ofa_tiny", d_model=32, ffn_dim=64, heads=2, encoder_layers=1,
                                     decoder_layers=1, vocab_size=V, max_source_positions=32,
                                     max_target_positions=32, attention_impl="math", dropout=0.0))


class SGDEngine(FakeEngine):
    """The trainer-step test's engine stand-in, with a plain SGD update at the end of each accumulation."""

    def __init__(self, model, gas: int, lr: float):
        super().__init__(model, gas)
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(self):
        super().step()
        if self.steps % self.gas == 0:
            self.opt.step()
            self.opt.zero_grad()


def group_batch(rows: int, refs: list[list[str]], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    src = torch.full((rows, 6), PAD)
    src[:, 0], src[:, 1:5], src[:, 5] = BOS, torch.randint(4, V, (rows, 4), generator=g), EOS
    return {"src_tokens": src, "patch_images": torch.randint(0, 256, (rows, 3, 32, 32), dtype=torch.uint8,
                                                             generator=g),
            "patch_masks": torch.ones(rows, dtype=torch.bool), "code_masks": torch.zeros(rows, dtype=torch.bool),
            "prev_output_tokens": torch.full((rows, 8), PAD), "target": torch.full((rows, 8), PAD),
            "task_ids": torch.tensor([0 if r else -1 for r in refs]), "references": refs}


def to_inputs(group, gb, m):
    from ofa_scale.objectives.batching import to_model_inputs

    return to_model_inputs(gb, "cpu")


def decode(tokens: torch.Tensor) -> str:
    return " ".join(f"w{t}" for t in tokens.tolist() if t != EOS)


def fixed_reward(texts, refs):
    """A deterministic stand-in for CIDEr: how many tokens of the hypothesis have an even id."""
    return [float(sum(int(w[1:]) % 2 == 0 for w in t.split())) for t in texts]


def sequence_logprob(model, gb, tokens: torch.Tensor) -> float:
    inputs = to_inputs("vl", gb, 0)
    prev, target = hypothesis_tensors([tokens])
    model.eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(inputs["src_tokens"][:1], inputs["patch_images"][:1], inputs["patch_masks"][:1],
                                     prev).float(), -1)
    return float(lp[0].gather(1, target[0][:, None]).sum())


SETTINGS = ScstSettings(generation=GenerationConfig(beam_size=5, max_len_b=6, no_repeat_ngram_size=3, nbest=5))
CTX = SimpleNamespace(dp_size=1, dp_group=None, tp_size=1, tp_rank=0, layout=SimpleNamespace(vocab_size=V))


def test_one_step_raises_the_best_hypothesis_and_lowers_the_worst():
    from ofa_scale.model.generate import generate

    model = tiny_model()
    # BatchNorm in eval mode, so the train-mode update and the eval-mode log-probabilities below are the same function
    apply_freezing(model, resnet=True)
    gb = group_batch(2, [["w4 w6"], []])  # the second row is padding: not generated for
    model.eval()
    inputs = to_inputs("vl", gb, 0)
    hyps = generate(model, {k: inputs[k][:1] for k in ("src_tokens", "patch_images", "patch_masks")},
                    SETTINGS.generation)[0]
    rewards = fixed_reward([decode(h.tokens) for h in hyps], None)
    best, worst = hyps[max(range(5), key=rewards.__getitem__)], hyps[min(range(5), key=rewards.__getitem__)]
    assert max(rewards) > min(rewards)
    before = sequence_logprob(model, gb, best.tokens), sequence_logprob(model, gb, worst.tokens)
    lps = [sequence_logprob(model, gb, h.tokens) for h in hyps]

    acc = TaskAccumulator(["caption"])
    engine = SGDEngine(model, gas=1, lr=0.05)
    stats = run_scst_step(engine, CTX, [{"vl": gb}], model=model, to_inputs=to_inputs, settings=SETTINGS,
                          reward=fixed_reward, decode=decode, acc=acc)
    assert model.training  # back in train mode after generation
    assert stats.hypotheses == 5 and stats.tokens == sum(len(h.tokens) for h in hyps)
    assert stats.reward == pytest.approx(sum(rewards) / 5)
    # the loss is Σ −log p · advantage over the generated tokens, divided by their count
    adv = advantages(torch.tensor(rewards, dtype=torch.float64))
    assert stats.loss == pytest.approx(-sum(a * lp for a, lp in zip(adv.tolist(), lps)) / stats.tokens,
                                       abs=1e-7)  # a difference of terms ~1: fp32 rounding is absolute
    assert acc.per_task[0, acc.TOKENS].item() == stats.tokens
    after = sequence_logprob(model, gb, best.tokens), sequence_logprob(model, gb, worst.tokens)
    assert after[0] > before[0], (before, after)
    assert after[1] < before[1], (before, after)
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_zero3_two_ranks_finish_and_equal_one_process(tmp_path, monkeypatch):
    """2 ranks under ZeRO-3: in each of the two micro-batches one rank scores two images while the other has only
    padding rows (it generates nothing and trains on a placeholder), so the ranks' decoder forward counts and
    hypothesis lengths differ; the lockstep keeps the collective forwards aligned. The step equals one process
    running both micro-batches."""
    monkeypatch.setattr(parallel_launch, "WORKER", WORKER)
    one = parallel_launch.launch("scst", 1, tmp_path / "one", timeout=240)
    two = parallel_launch.launch("scst", 2, tmp_path / "two", timeout=240)
    assert two[0]["stats"] == two[1]["stats"]  # global values, the same on every rank
    s1, s2 = one[0]["stats"], two[0]["stats"]
    assert s2["hypotheses"] == s1["hypotheses"] == 20 and s2["tokens"] == s1["tokens"] > 0
    assert s2["reward"] == pytest.approx(s1["reward"], rel=1e-6)
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-4, abs=1e-6)
    assert one[0]["changed"] and two[0]["changed"]
    a, b = torch.load(tmp_path / "one" / "delta.pt"), torch.load(tmp_path / "two" / "delta.pt")
    for n, d in a.items():  # the update of every parameter
        torch.testing.assert_close(b[n], d, rtol=1e-3, atol=1e-7, msg=n)
    assert math.isfinite(s2["loss"])

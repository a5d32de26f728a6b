"""The text-to-image task module (spec §7.6, extensions §10.5-§10.6): OFA's source/target tokens, generation of
exactly 1024 code tokens with no special token, ranking by CLIP (or by log-probability without it), CLIP-SCST's
update direction on a tiny model, the results/metrics contract and the recipes' OFA values."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import ConfigError, UserError
from ofa_scale.finetune.freeze import apply_freezing
from ofa_scale.finetune.scst import advantages, hypothesis_tensors, run_scst_step
from ofa_scale.model.generate import NUM_SPECIAL
from ofa_scale.training.config import load_training_config

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from closed_set_helpers import collate  # noqa: E402
from image_gen_helpers import image_gen_task, tiny_model, train_tokenizer  # noqa: E402
from test_scst import SGDEngine  # noqa: E402

BOS, PAD, EOS = 0, 1, 2
REPO = Path(__file__).resolve().parents[2]
# fairseq dictionary ids of OFA's prompt " what is the complete image? caption:" under the GPT-2 BPE (dict.txt)
OFA_PROMPT_IDS = [99, 16, 5, 1498, 2274, 116, 3747, 35]


def record(caption="A Red circle on a plain background", codes=None, uid="img-1"):
    codes = list(range(1024)) if codes is None else codes
    return {"key": uid, "meta": {"uniq_id": uid, "codes": codes, "caption": caption}, "image": None}


@pytest.fixture(scope="module")
def gpt2(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    return load_tokenizer("sentencepiece", train_tokenizer(tmp_path_factory.mktemp("image_gen_tok")), num_bins=2)


# ---------------------------------------------------------------------------------------------- builder
def test_training_example_tokens_are_ofas(gpt2):
    task = image_gen_task(gpt2)
    codes = [(7 * i) % 8192 for i in range(1024)]
    ex, = task.train_examples(record(codes=codes))
    assert ex["source"] == [BOS, *OFA_PROMPT_IDS, *gpt2.encode(" a red circle on a plain background"), EOS]
    assert ex["target"] == [50265 + c for c in codes] + [EOS]  # OFA's codes + 50265, + eos
    assert ex["prev_output"] == [BOS] + [50265 + c for c in codes]
    assert ex["code_mask"] is True and ex["image"] is None and ex["patch_mask"] is False
    assert ex["constraint"] == {"range": (50265, 58457)}  # OFA's --constraint-range=50265,58457
    assert "references" not in ex
    assert task.lengths()[1] == 1025


def test_caption_is_lower_cased_and_cut_to_64_words(gpt2):
    task = image_gen_task(gpt2)
    ex, = task.train_examples(record(caption=" ".join(f"Word{i}" for i in range(80))))
    text = gpt2.decode(ex["source"][1 + len(OFA_PROMPT_IDS):-1])
    assert text.split() == [f"word{i}" for i in range(64)]
    assert len(ex["source"]) <= task.lengths()[0]


def test_stage2_examples_carry_the_caption_and_eval_items_have_no_image(gpt2):
    ex, = image_gen_task(gpt2, criterion="scst").train_examples(record())
    assert ex["references"] == ["a red circle on a plain background"] and "constraint" not in ex
    item = image_gen_task(gpt2).eval_item(record(uid="x7"))
    assert item.id == "x7" and item.image.numel() == 0 and item.decoder_prompt == [BOS]
    assert item.reference == {"caption": "a red circle on a plain background"}


def test_bad_rows_are_user_errors(gpt2):
    task = image_gen_task(gpt2)
    with pytest.raises(UserError, match="1024"):
        task.train_examples(record(codes=[1, 2, 3]))
    assert task.train_examples(record(caption="   ")) == [] and task.eval_item(record(caption="")) is None
    with pytest.raises(ConfigError, match="scst"):
        image_gen_task(gpt2, criterion="scst").scst_parts("cpu")  # CLIP-SCST without CLIP weights


# ---------------------------------------------------------------------------------------------- generation
class RedScorer:
    """A CLIP stand-in: cosine = how red the picture is (its mean red minus mean green, scaled)."""

    def cosine(self, images, texts):
        arr = [np.asarray(im, dtype=np.float64) for im in images]
        return torch.tensor([(a[..., 0].mean() - a[..., 1].mean()) / 255.0 for a in arr])


def test_generation_gives_exactly_1024_codes_and_no_special_token(small_tok, monkeypatch):
    import ofa_scale.finetune.image_gen as image_gen

    task = image_gen_task(small_tok, samples=3)
    model = tiny_model(len(small_tok))
    items = [task.eval_item(record(caption=c, uid=str(i))) for i, c in enumerate(("a red circle", "a blue star"))]
    generated, real = [], image_gen.generate

    def generate_once(*args, **kwargs):  # one sampling pass (1024 steps), reused by the second predict below
        if not generated:
            generated.append(real(*args, **kwargs))
        return generated[0]

    monkeypatch.setattr(image_gen, "generate", generate_once)
    task.scorer = RedScorer()
    preds = task.predict(model, items, device=torch.device("cpu"))
    lo, hi = task.code_range
    assert hi - lo == 8192
    for sample in generated[0]:
        assert len(sample) == 3
        for h in sample:
            tokens = h.tokens
            assert tokens.numel() == 1025 and int(tokens[-1]) == EOS
            assert bool(((tokens[:-1] >= lo) & (tokens[:-1] < hi)).all())  # codes only: no bos/pad/eos/unk/text
            assert not bool((tokens[:-1] < NUM_SPECIAL).any())

    # predict: best first by the scorer; without one by log-probability, and clip_score left out
    for p in preds:
        assert p["codes"].shape == (3, 1024) and p["codes"].dtype == torch.int16
        assert int(p["codes"].min()) >= 0 and int(p["codes"].max()) < 8192
        assert p["clip"] == sorted(p["clip"], reverse=True)
        redness = RedScorer().cosine(task.pictures(p["codes"]), [""] * 3).tolist()
        assert redness == pytest.approx(p["clip"], abs=1e-6)  # the ranking is the scorer's order
    assert set(task.score(preds, items)) == {"clip_score", "code_logprob"}

    plain = image_gen_task(small_tok, samples=3)  # no task.clip_weights: the same samples, by log-probability
    preds = plain.predict(model, items, device=torch.device("cpu"))
    assert all(p["clip"] is None and p["logprob"] == sorted(p["logprob"], reverse=True) for p in preds)
    metrics = plain.score(preds, items)
    assert set(metrics) == {"code_logprob"} and plain.main_metric == "code_logprob"
    assert metrics["code_logprob"] < 0


def test_eval_files_are_the_results_contract(small_tok, tmp_path):
    from ofa_scale.finetune.evaluate import EvalResult, write_outputs

    task = image_gen_task(small_tok, samples=2)
    items = [task.eval_item(record(caption="a red circle", uid="r/1")), task.eval_item(record(uid="b"))]
    codes = torch.randint(0, 8192, (2, 1024), generator=torch.Generator().manual_seed(1)).to(torch.int16)
    preds = [{"id": i.id, "codes": codes, "logprob": [-5.0, -9.0], "clip": [0.3, 0.1]} for i in items]
    result = EvalResult({"clip_score": 0.3, "code_logprob": -0.005}, 2, 1.0, preds, items)
    paths = write_outputs(tmp_path / "out", task, result, label="image_gen_stage1_base")
    results = json.loads(paths["results"].read_text())
    assert [r["id"] for r in results] == ["r/1", "b"]
    assert results[0]["images"] == ["images/r_1_0.png", "images/r_1_1.png"]  # best first, relative to DIR
    for r in results:
        for png in r["images"]:
            assert (tmp_path / "out" / png).is_file()
    assert (tmp_path / "out" / "contact_sheet.png").is_file()
    assert json.loads(paths["metrics"].read_text())["clip_score"] == 0.3
    assert len(paths["artifacts"]) == 5  # 4 PNGs + the sheet, for mlflow


# ---------------------------------------------------------------------------------------------- CLIP-SCST
CTX = SimpleNamespace(dp_size=1, dp_group=None, tp_size=1, tp_rank=0, layout=SimpleNamespace(vocab_size=None))


def redness(pictures, references):
    """A fixed reward: 2.5 × how red each picture is (RedScorer through ClipReward, as CLIP would be used)."""
    from ofa_scale.finetune.image_gen import ClipReward

    return ClipReward(RedScorer())(pictures, references)


def test_clip_scst_step_raises_the_best_sample_and_lowers_the_worst(small_tok, monkeypatch):
    import ofa_scale.finetune.scst as scst
    from ofa_scale.objectives.batching import to_model_inputs

    task = image_gen_task(small_tok, samples=4, criterion="scst")
    settings, reward, decode = task.scst_parts("cpu", reward=redness)
    assert settings.constraint_range == task.code_range and settings.generation.beam_size == 4
    model = tiny_model(len(small_tok))
    apply_freezing(model, resnet=True)  # BatchNorm statistics fixed: train-mode update, eval-mode log-probs agree
    examples = task.train_examples(record(caption="a red square"))
    gb = collate(examples, "image_gen", task.lengths(), 16, len(small_tok))
    assert gb["references"] == [["a red square"]] and bool(gb["code_masks"][0])
    inputs = to_model_inputs(gb, "cpu")

    def logprob(tokens):
        prev, target = hypothesis_tensors([tokens])
        with torch.no_grad():
            logits = model(inputs["src_tokens"], inputs["patch_images"], inputs["patch_masks"], prev,
                           code_masks=inputs["code_masks"]).float()
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[:NUM_SPECIAL] = True
        keep[task.code_range[0]:task.code_range[1]] = True
        lp = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1)  # the constrained softmax, as OFA
        return float(lp[0].gather(1, target[0][:, None]).sum())

    # the step's own samples, and their log-probabilities before its update (the model is in eval mode there)
    seen, real = {}, scst.generate

    def generate_and_measure(*args, **kwargs):
        hyps = real(*args, **kwargs)
        seen["hyps"], seen["before"] = hyps[0], [logprob(h.tokens) for h in hyps[0]]
        return hyps

    monkeypatch.setattr(scst, "generate", generate_and_measure)
    torch.manual_seed(3)
    engine = SGDEngine(model, gas=1, lr=0.05)
    stats = run_scst_step(engine, CTX, [{"vl": gb}], model=model, to_inputs=lambda g, b, m: to_model_inputs(b, "cpu"),
                          settings=settings, reward=reward, decode=decode)
    hyps, before = seen["hyps"], seen["before"]
    rewards = reward([decode(h.tokens) for h in hyps], ["a red square"])
    assert len(hyps) == 4 and max(rewards) > min(rewards)
    # 4 samples of 1025 generated tokens each (sample_size); the logged reward is their mean 2.5·cos
    assert stats.hypotheses == 4 and stats.tokens == 4 * 1025
    assert stats.reward == pytest.approx(float(np.mean(rewards)), rel=1e-5)
    adv = advantages(torch.tensor(rewards, dtype=torch.float64))  # score − mean of the other 3
    assert stats.loss == pytest.approx(-sum(a * lp for a, lp in zip(adv.tolist(), before)) / stats.tokens,
                                       rel=1e-3)
    model.eval()
    best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
    after = logprob(hyps[best].tokens), logprob(hyps[worst].tokens)
    assert after[0] > before[best], (before, after)
    assert after[1] < before[worst], (before, after)


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("size", ["base", "large"])
def test_recipes_carry_ofas_values(size):
    s1 = load_training_config(REPO / "configs/finetune" / f"image_gen_stage1_{size}.yaml")
    s2 = load_training_config(REPO / "configs/finetune" / f"image_gen_stage2_{size}.yaml")
    for cfg in (s1, s2):
        assert cfg.model.arch == f"ofa_{size}" and cfg.task.name == "image_gen"
        assert cfg.model.overrides["code_image_size"] == 256  # a 32x32 code grid: 1024 codes
        assert (cfg.task.max_src_length, cfg.task.max_tgt_length) == (64, 1024)
        d = cfg.task.decoding
        assert (d.beam, d.sampling_topk, d.temperature, d.min_len, d.max_len_b, d.max_len_a) == (24, 256, 1.0, 1024,
                                                                                             1024, 0.0)
        assert cfg.objectives.label_smoothing == 0.0 and cfg.task.clip_arch == "ViT-B-16"
        assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == ([0.9, 0.999], 1e-8, 0.01)
    # stage 1: 4 nodes x 8 GPUs x 4 x 4 = 512; lr 1e-3; 40,000 updates, 2,000 warm-up; drop path 0.1
    assert (s1.task.criterion, s1.optim.lr, s1.train.global_batch_size, s1.train.micro_batch_size) == ("ce", 1e-3,
                                                                                                       512, 4)
    assert (s1.train.steps, s1.schedule.warmup_steps) == (40000, 2000)
    assert s1.model.overrides["decoder_drop_path_rate"] == 0.1
    # stage 2: CLIP-SCST, 1 caption x 32 GPUs, lr 1e-6, 5,000 updates, no warm-up, dropout 0, frozen ResNet
    assert (s2.task.criterion, s2.optim.lr, s2.train.global_batch_size, s2.train.micro_batch_size) == ("scst", 1e-6,
                                                                                                       32, 1)
    assert (s2.train.steps, s2.schedule.warmup_steps, s2.model.overrides["dropout"]) == (5000, 0, 0.0)
    sc = s2.task.scst
    assert (sc.beam, sc.sampling_topk, sc.temperature, sc.min_len, sc.max_len_b) == (5, 256, 1.0, 1024, 1024)
    assert s2.train.freeze_resnet and s2.task.clip_weights


def test_clip_scst_refuses_pipeline_parallelism():
    with pytest.raises(ConfigError, match="pp=2"):
        load_training_config(REPO / "configs/finetune/image_gen_stage2_base.yaml", ["parallel.pp=2"])

"""configs/finetune: one recipe per task and size (issue 10 §6 names), loading with the training config and
carrying OFA's hyper-parameters. The expectations below are copied from spec §7.1-§7.4 (OFA's run_scripts loop
values), not from the YAML files, so an edit that drifts from OFA fails here."""

from pathlib import Path

import pytest

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data.sample_finetune import write_finetune_corpus
from ofa_scale.errors import ConfigError
from ofa_scale.training.config import load_training_config

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "configs" / "finetune"
BPE = REPO.parent / "shared" / "ofa-bpe"

CAPTION_EVAL = dict(inference="beam", beam=5, max_len_b=16, min_len=1, no_repeat_ngram_size=3, unnormalized=False)
GROUNDING_EVAL = dict(inference="beam", beam=5, max_len_b=4, min_len=4, no_repeat_ngram_size=3, unnormalized=False)
ALLCAND = dict(inference="allcand")

# name: (task, lr, global batch = GPUs x batch x update_freq, micro batch = per-GPU batch, epochs, update cap,
#        warm-up (ratio, or int updates), label smoothing, image size, drop path, decoding, best metric)
SPEC = {
    "caption_stage1_base": ("caption", 1e-5, 4 * 8 * 4, 8, 5, 0, 0.06, 0.1, 480, 0.1, CAPTION_EVAL, "cider"),
    "caption_stage1_large": ("caption", 1e-5, 4 * 8 * 4, 8, 2, 0, 0.06, 0.1, 480, 0.1, CAPTION_EVAL, "cider"),
    "caption_stage2_base": ("caption", 1e-5, 8 * 2 * 4, 2, 3, 0, 0.06, 0.0, 480, 0.0, CAPTION_EVAL, "cider"),
    "caption_stage2_large": ("caption", 1e-5, 8 * 2 * 4, 2, 3, 0, 0.06, 0.0, 480, 0.0, CAPTION_EVAL, "cider"),
    "vqa_base": ("vqa", 5e-5, 4 * 8 * 4 * 4, 4, 15, 0, 0.04, 0.1, 480, 0.1, ALLCAND, "vqa_score"),
    "vqa_large": ("vqa", 5e-5, 4 * 8 * 4 * 4, 4, None, 40000, 1000, 0.1, 480, 0.2, ALLCAND, "vqa_score"),
    "refcoco_base": ("refcoco", 5e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.1, GROUNDING_EVAL, "acc@0.5"),
    "refcoco_large": ("refcoco", 3e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.2, GROUNDING_EVAL, "acc@0.5"),
    "refcocoplus_base": ("refcoco", 5e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.1, GROUNDING_EVAL, "acc@0.5"),
    "refcocoplus_large": ("refcoco", 3e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.2, GROUNDING_EVAL, "acc@0.5"),
    "refcocog_base": ("refcoco", 5e-5, 4 * 4 * 8, 4, 12, 0, 0.06, 0.1, 512, 0.1, GROUNDING_EVAL, "acc@0.5"),
    "refcocog_large": ("refcoco", 3e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.2, GROUNDING_EVAL, "acc@0.5"),
    "snli_ve_base": ("snli_ve", 5e-5, 8 * 4 * 8, 4, 5, 0, 0.06, 0.0, 480, 0.1, ALLCAND, "accuracy"),
    "snli_ve_large": ("snli_ve", 2e-5, 8 * 4 * 8, 4, 6, 0, 0.06, 0.0, 480, 0.2, ALLCAND, "accuracy"),
}
# task -> (prompt type, max_src_length, max_tgt_length, token embeddings frozen, EMA decay)
TASK = {"caption": ("none", 80, 20, True, 0.0), "vqa": ("prev_output", 80, 30, True, 0.9999),
        "refcoco": ("none", 80, 20, False, 0.0), "snli_ve": ("prev_output", 80, 20, False, 0.0)}


def _load(name, *overrides):
    return load_training_config(FINETUNE / f"{name}.yaml", list(overrides))


def test_the_recipe_set_is_the_issue_contract():
    names = {p.stem for p in FINETUNE.glob("*.yaml")}
    assert names == {f"{t}_{s}" for t in ("caption_stage1", "caption_stage2", "vqa", "refcoco", "refcocoplus",
                                          "refcocog", "snli_ve") for s in ("base", "large")}
    assert names == set(SPEC)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_recipe_has_ofas_hyper_parameters(name):
    task, lr, gbs, mbs, epochs, cap, warmup, ls, size, drop_path, decoding, best = SPEC[name]
    cfg = _load(name)
    assert cfg.model.arch == "ofa_" + name.rsplit("_", 1)[1]
    assert cfg.model.pretrained  # a placeholder path the user overrides
    assert cfg.task.name == task and cfg.task.best_metric == best
    assert cfg.optim.lr == pytest.approx(lr)
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.clip_norm) == ([0.9, 0.999], 1e-8,
                                                                                             0.01, 1.0)
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (gbs, mbs)
    if epochs is not None:
        assert cfg.train.epochs == epochs
    assert cfg.train.steps == cap
    if isinstance(warmup, int):
        assert cfg.schedule.warmup_steps == warmup
    else:
        assert cfg.schedule.warmup_steps is None and cfg.schedule.warmup_ratio == pytest.approx(warmup)
    assert cfg.schedule.end_lr == pytest.approx(2e-7 if name == "caption_stage2_large" else 0.0)
    assert cfg.objectives.label_smoothing == pytest.approx(ls)
    assert cfg.task.image_size == size
    ov = cfg.model.overrides
    assert ov["encoder_drop_path_rate"] == ov["decoder_drop_path_rate"] == pytest.approx(drop_path)
    assert ov["dropout"] == pytest.approx(0.0 if "stage2" in name else 0.1) and ov["attention_dropout"] == 0.0
    for key, value in decoding.items():
        assert getattr(cfg.task.decoding, key) == value, key
    prompt, src, tgt, frozen, ema = TASK[task]
    assert (cfg.task.prompt_type, cfg.task.max_src_length, cfg.task.max_tgt_length) == (prompt, src, tgt)
    assert cfg.train.freeze_encoder_embedding is cfg.train.freeze_decoder_embedding is frozen
    assert not cfg.train.freeze_resnet
    assert (cfg.train.ema_decay, cfg.train.ema_start) == (ema, 0)
    assert cfg.data.train and cfg.data.valid and not cfg.data.root
    assert cfg.data.tokenizer.kind == "gpt2-bpe"


def test_task_specific_settings():
    s1, s2 = _load("caption_stage1_base"), _load("caption_stage2_base")
    assert (s1.objectives.drop_worst_ratio, s1.objectives.drop_worst_after) == (0.2, 6000)
    assert _load("caption_stage1_large").objectives.drop_worst_after == 2500
    assert s1.task.criterion == "ce" and s2.task.criterion == "scst" and s2.objectives.drop_worst_ratio == 0
    assert (s2.task.scst.beam, s2.task.scst.max_len_b, s2.task.scst.no_repeat_ngram_size) == (5, 16, 3)
    vqa = _load("vqa_base")
    assert vqa.task.add_object and vqa.task.max_object_length == 30 and vqa.task.constrained_training
    assert vqa.task.answers and vqa.task.decoding.batch_size == 20
    assert vqa.task.decoding.beam == 5 and vqa.task.decoding.unnormalized  # the beam alternative, as OFA's
    assert vqa.task.valid_interval == 0  # OFA validates VQA at epoch ends only
    snli = _load("snli_ve_base")
    assert snli.task.add_caption and snli.task.constrained_training
    for name in ("refcoco_base", "refcocoplus_large", "refcocog_base"):
        assert _load(name).task.box_normaliser == 512.0
    for name in SPEC:
        if not name.startswith("vqa"):
            assert _load(name).task.valid_interval == 500  # OFA --validate-interval-updates=500


def test_contract_keys_can_be_set_on_the_command_line(tmp_path):
    cfg = _load("vqa_base", f"data.train={tmp_path}/t", f"data.valid={tmp_path}/v", f"data.tokenizer.path={tmp_path}",
                f"model.pretrained={tmp_path}/m.pt", "train.global_batch_size=8", "train.micro_batch_size=2",
                "train.steps=20", f"task.answers={tmp_path}/a.txt", "task.image_size=64")
    assert (cfg.data.train, cfg.data.valid, cfg.model.pretrained) == (f"{tmp_path}/t", f"{tmp_path}/v",
                                                                      f"{tmp_path}/m.pt")
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.steps) == (8, 2, 20)
    assert cfg.task.image_size == 64 and cfg.task.answers == f"{tmp_path}/a.txt"
    with pytest.raises(ConfigError, match="micro_batch_size"):
        _load("vqa_base", "train.micro_batch_size=3")


# recipe prefix -> the sample training TSV in its format (the check reads the shards' source and sample count)
TRAIN_TSV = {"caption_stage1": ("caption", "caption_stage1_train.tsv"),
             "caption_stage2": ("caption", "caption_stage2_train.tsv"), "vqa": ("vqa", "vqa_train.tsv"),
             "refcoco": ("refcoco", "refcoco_train.tsv"), "snli_ve": ("snli_ve", "snli_ve_train.tsv")}


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory):
    """Shards of every finetune format with at least one global batch of OFA's sizes (VQA: 512 rows)."""
    root = tmp_path_factory.mktemp("recipes")
    tsv = write_finetune_corpus(root / "tsv", images=300, eval_images=1, seed=2)
    shards = {}
    for prefix, (fmt, name) in TRAIN_TSV.items():
        shards[prefix] = root / prefix
        assert preprocess_main(["shards", "--format", fmt, "--input", str(tsv[name]), "--out", str(shards[prefix]),
                                "--no-progress"]) == 0
    assert preprocess_main(["vqa-answers", "--input", str(tsv["vqa_train.tsv"]), "--out",
                            str(root / "answers.txt")]) == 0
    return shards, root / "answers.txt"


@pytest.mark.parametrize("name", sorted(SPEC))
def test_check_builds_every_recipe_for_8_ranks(name, sample_shards):
    """`ofa-train --check` (in process): the recipe's workload, task and layout build with OFA's batch on 8 ranks."""
    from ofa_scale.training.check import check_config

    shards, answers = sample_shards
    recipe = name.rsplit("_", 1)[0]
    data = shards[{"refcocoplus": "refcoco", "refcocog": "refcoco"}.get(recipe, recipe)]
    # vqa_large warms up for 1,000 updates; the 600-row sample gives 100 in its 100 epochs
    extra = ["schedule.warmup_steps=10"] if name == "vqa_large" else []
    cfg = _load(name, f"data.train={data}", f"data.valid={data}", f"data.tokenizer.path={BPE}",
                f"task.answers={answers}", "model.pretrained=null", *extra)
    report = check_config(cfg, 8)
    assert "config is valid for 8 process(es)" in report
    arch = "ofa_large" if name.endswith("large") else "ofa_base"
    assert f"model: {arch} (" in report and "dp 8" in report

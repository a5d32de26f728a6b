"""configs/finetune: one recipe per task and size (issue 10 §6 names), loading with the training config and
carrying OFA's hyper-parameters. The expectations below are copied from spec §7.1-§7.4 (OFA's run_scripts loop
values), not from the YAML files, so an edit that drifts from OFA fails here."""

from pathlib import Path

import pytest

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data.sample_finetune import write_finetune_corpus
from ofa_scale.data.sample_ocr import find_cjk_font, write_ocr_corpus, write_sample_vocab
from ofa_scale.errors import ConfigError, UserError
from ofa_scale.training.config import load_training_config

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "configs" / "finetune"
BPE = REPO.parent / "shared" / "ofa-bpe"

CAPTION_EVAL = dict(inference="beam", beam=5, max_len_b=16, min_len=1, no_repeat_ngram_size=3, unnormalized=False)
GROUNDING_EVAL = dict(inference="beam", beam=5, max_len_b=4, min_len=4, no_repeat_ngram_size=3, unnormalized=False)
ALLCAND = dict(inference="allcand")
# OFA-OCR's run_scripts/ocr/evaluate_ocr{,_base}.sh (spec §10.2.5): eval batch 16 (base) / 8 (large) per GPU
OCR_EVAL = dict(inference="beam", beam=5, max_len_b=64, min_len=1, no_repeat_ngram_size=0, unnormalized=False)
# OFA-CN's generate_caption_cn.sh (spec §10.1.6): beam 8, at most 128 tokens, 16 images per GPU
MUGE_EVAL = dict(inference="beam", beam=8, max_len_b=128, min_len=1, no_repeat_ngram_size=3, unnormalized=False,
                 batch_size=16)

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
    # Encouraging Loss scripts (spec §10.4.3): the large recipes' values, plus objectives.loss (test below)
    "caption_stage1_el_large": ("caption", 1e-5, 4 * 8 * 4, 8, 2, 0, 0.06, 0.1, 480, 0.1, CAPTION_EVAL, "cider"),
    "refcoco_el_large": ("refcoco", 3e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.2, GROUNDING_EVAL, "acc@0.5"),
    "refcocoplus_el_large": ("refcoco", 3e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.2, GROUNDING_EVAL, "acc@0.5"),
    "refcocog_el_large": ("refcoco", 3e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.2, GROUNDING_EVAL, "acc@0.5"),
    # OFA-OCR (spec §10.2.4): ModelScope's lr, warm-up, end lr and 4 rows per GPU; the caption scripts' batch,
    # epochs, label smoothing and drop path (OFA has no OCR training script)
    "ocr_base": ("ocr", 5e-5, 128, 4, 5, 0, 0.01, 0.1, 480, 0.1, OCR_EVAL, "accuracy"),
    "ocr_large": ("ocr", 5e-5, 128, 4, 2, 0, 0.01, 0.1, 480, 0.1, OCR_EVAL, "accuracy"),
    # OFA-CN (spec §10.1.6-§10.1.7): the English caption stage-1 / RefCOCO scripts with bpe=bert (OFA ships no
    # Chinese training script), OFA-CN's decoding
    "muge_caption_base": ("caption", 1e-5, 4 * 8 * 4, 8, 5, 0, 0.06, 0.1, 480, 0.1, MUGE_EVAL, "cider"),
    "muge_caption_large": ("caption", 1e-5, 4 * 8 * 4, 8, 2, 0, 0.06, 0.1, 480, 0.1, MUGE_EVAL, "cider"),
    "refcoco_cn_base": ("refcoco", 5e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.1,
                        {**GROUNDING_EVAL, "batch_size": 16}, "acc@0.5"),
    "refcoco_cn_large": ("refcoco", 3e-5, 4 * 4 * 8, 4, 10, 0, 0.06, 0.1, 512, 0.2,
                         {**GROUNDING_EVAL, "batch_size": 16}, "acc@0.5"),
    # prompt tuning (spec-ext §10.3.6): train_refcoco_{prefix,adapter,bitfit}.sh (8 GPUs x 16 x update_freq 8,
    # 100 epochs, 480 px; lr from their {0.03, 5e-5, 1e-4} sweep); SNLI-VE: snli_ve_large with the prefix's lr
    "refcoco_prefix_large": ("refcoco", 0.03, 8 * 16 * 8, 16, 100, 0, 0.06, 0.1, 480, 0.2, GROUNDING_EVAL, "acc@0.5"),
    "refcoco_adapter_large": ("refcoco", 1e-4, 8 * 16 * 8, 16, 100, 0, 0.06, 0.1, 480, 0.2, GROUNDING_EVAL,
                              "acc@0.5"),
    "refcoco_bitfit_large": ("refcoco", 1e-4, 8 * 16 * 8, 16, 100, 0, 0.06, 0.1, 480, 0.2, GROUNDING_EVAL, "acc@0.5"),
    "snli_ve_prefix_large": ("snli_ve", 0.03, 8 * 4 * 8, 4, 6, 0, 0.06, 0.0, 480, 0.2, ALLCAND, "accuracy"),
    # MuE (spec-ext §10.7.3): train_caption_stage1_base_MuE.sh (4 GPUs x 2 x 4) and train_snli_ve_base_MuE.sh
    # (2 GPUs x 4 x 8); the decomposed encoder and the all-layer loss are checked in tests/model/test_early_exit_mue.py
    "caption_stage1_base_mue": ("caption", 1e-5, 4 * 2 * 4, 2, 5, 0, 0.06, 0.1, 480, 0.1, CAPTION_EVAL, "cider"),
    "snli_ve_base_mue": ("snli_ve", 5e-5, 2 * 4 * 8, 4, 5, 0, 0.06, 0.0, 480, 0.1, ALLCAND, "accuracy"),
}
# prompt-tuning recipes: model.prompt_tuning (kind, prefix length, adapter width); every other recipe has kind none
PROMPT = {"refcoco_prefix_large": ("prefix", 100, None), "snli_ve_prefix_large": ("prefix", 100, None),
          "refcoco_adapter_large": ("adapter", None, 100), "refcoco_bitfit_large": ("bitfit", None, None)}
# OFA-CN recipes: Chinese prompts, the bert tokenizer; MUGE's caption budget counts BERT tokens (= decoding's 128)
CN_RECIPES = {"muge_caption_base": 128, "muge_caption_large": 128, "refcoco_cn_base": 20, "refcoco_cn_large": 20}
END_LR = {"caption_stage2_large": 2e-7, "ocr_base": 1e-7, "ocr_large": 1e-7}  # others decay to 0
# task -> (prompt type, max_src_length, max_tgt_length, token embeddings frozen, EMA decay)
TASK = {"caption": ("none", 80, 20, True, 0.0), "vqa": ("prev_output", 80, 30, True, 0.9999),
        "refcoco": ("none", 80, 20, False, 0.0), "snli_ve": ("prev_output", 80, 20, False, 0.0),
        "ocr": ("none", 128, 30, True, 0.0)}


def _load(name, *overrides):
    return load_training_config(FINETUNE / f"{name}.yaml", list(overrides))


def test_the_recipe_set_is_the_issue_contract():
    # the text-only recipes (glue_*, gigaword_*) are checked against OFA's values in test_text_recipes.py,
    # text-to-image (image_gen_*) in tests/finetune/test_image_gen_task.py, ImageNet (imagenet_*) in
    # tests/finetune/test_imagenet_task.py
    names = {p.stem for p in FINETUNE.glob("*.yaml")
             if not p.stem.startswith(("glue_", "gigaword_", "image_gen_", "imagenet_"))}
    assert names >= {f"{t}_{s}" for t in ("caption_stage1", "caption_stage2", "vqa", "refcoco", "refcocoplus",
                                          "refcocog", "snli_ve") for s in ("base", "large")}
    assert names == set(SPEC)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_recipe_has_ofas_hyper_parameters(name):
    task, lr, gbs, mbs, epochs, cap, warmup, ls, size, drop_path, decoding, best = SPEC[name]
    cfg = _load(name)
    assert cfg.model.arch == "ofa_" + name.removesuffix("_mue").rsplit("_", 1)[1]
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
    assert cfg.schedule.end_lr == pytest.approx(END_LR.get(name, 0.0))
    assert cfg.objectives.label_smoothing == pytest.approx(ls)
    assert cfg.task.image_size == size
    ov = cfg.model.overrides
    assert ov["encoder_drop_path_rate"] == ov["decoder_drop_path_rate"] == pytest.approx(drop_path)
    assert ov["dropout"] == pytest.approx(0.0 if "stage2" in name else 0.1) and ov["attention_dropout"] == 0.0
    for key, value in decoding.items():
        assert getattr(cfg.task.decoding, key) == value, key
    prompt, src, tgt, frozen, ema = TASK[task]
    assert (cfg.task.prompt_type, cfg.task.max_src_length, cfg.task.max_tgt_length) == (prompt, src,
                                                                                        CN_RECIPES.get(name, tgt))
    if task != "ocr":  # OFA-OCR's language: test_encouraging_loss_and_ocr_recipe_settings
        assert cfg.task.language == ("zh" if name in CN_RECIPES else "en")
    assert cfg.train.freeze_encoder_embedding is cfg.train.freeze_decoder_embedding is frozen
    assert not cfg.train.freeze_resnet
    assert (cfg.train.ema_decay, cfg.train.ema_start) == (ema, 0)
    assert cfg.data.train and cfg.data.valid and not cfg.data.root
    # OFA-OCR is an OFA-CN model
    assert cfg.data.tokenizer.kind == ("bert" if task == "ocr" or name in CN_RECIPES else "gpt2-bpe")


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
             "refcoco": ("refcoco", "refcoco_train.tsv"), "snli_ve": ("snli_ve", "snli_ve_train.tsv"),
             "ocr": ("ocr", "ocr_train.tsv")}


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory):
    """Shards of every finetune format with at least one global batch of OFA's sizes (VQA: 512 rows)."""
    root = tmp_path_factory.mktemp("recipes")
    tsv = write_finetune_corpus(root / "tsv", images=300, eval_images=1, seed=2)
    # the OCR lines need a CJK font (scripts/install_system_packages.sh); without one only the OCR recipes skip,
    # and the Chinese recipes still get the sample BERT vocabulary
    write_sample_vocab(root / "tsv" / "ocr_vocab")
    try:
        find_cjk_font()
    except UserError as e:
        no_font = str(e)
    else:
        no_font = None
        tsv.update(write_ocr_corpus(root / "tsv", images=300, eval_images=1, seed=2))
    shards = {"no_font": no_font}
    for prefix, (fmt, name) in TRAIN_TSV.items():
        if fmt == "ocr" and no_font:
            continue
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
    recipe = name.removesuffix("_mue").rsplit("_", 1)[0].removesuffix("_el")  # EL and MuE recipes: the same data
    if recipe == "ocr" and shards["no_font"]:
        pytest.skip(f"no OCR sample lines: {shards['no_font']}")
    data = shards[{"refcocoplus": "refcoco", "refcocog": "refcoco", "muge_caption": "caption_stage1",
                   "refcoco_cn": "refcoco", "refcoco_prefix": "refcoco", "refcoco_adapter": "refcoco",
                   "refcoco_bitfit": "refcoco", "snli_ve_prefix": "snli_ve"}.get(recipe, recipe)]
    # prompt tuning needs a base model that exists (the check reads no weights, so any existing path stands in)
    pretrained = str(data) if name in PROMPT else "null"
    # vqa_large warms up for 1,000 updates; the 600-row sample gives 100 in its 100 epochs
    extra = ["schedule.warmup_steps=10"] if name == "vqa_large" else []
    if name in PROMPT and name.startswith("refcoco"):  # OFA's 1024 rows per update exceed the ~500 sample rows
        extra = [*extra, "train.global_batch_size=128"]
    bert = recipe == "ocr" or name in CN_RECIPES  # a small BERT vocab.txt (the sample OCR corpus writes one)
    tokenizer = shards["caption_stage1"].parent / "tsv" / "ocr_vocab" if bert else BPE
    cfg = _load(name, f"data.train={data}", f"data.valid={data}", f"data.tokenizer.path={tokenizer}",
                f"task.answers={answers}", f"model.pretrained={pretrained}", *extra)
    report = check_config(cfg, 8)
    assert "config is valid for 8 process(es)" in report
    arch = "ofa_large" if name.endswith("large") else "ofa_base"
    assert f"model: {arch} (" in report and "dp 8" in report


def test_encouraging_loss_and_ocr_recipe_settings():
    """Spec §10.4.3 (log_end 0.75; the caption EL script's drop-worst 0.05 after 2500; none for RefCOCO) and
    §10.2.3-§10.2.5 (BERT-CN: Chinese prompt, 30 characters; line images, eval batch 16 base / 8 large; plain
    cross entropy)."""
    for name in ("caption_stage1_el_large", "refcoco_el_large", "refcocoplus_el_large", "refcocog_el_large"):
        obj = _load(name).objectives
        assert (obj.loss, obj.log_end, obj.encouraging_log_end) == ("encouraging", 0.75, 0.75)
        want = (0.05, 2500) if name.startswith("caption") else (0.0, 0)
        assert (obj.drop_worst_ratio, obj.drop_worst_after) == want
    for name, batch in (("ocr_base", 16), ("ocr_large", 8)):
        cfg = _load(name)
        assert cfg.data.tokenizer.kind == "bert" and cfg.task.extra == {"is_document": False}
        assert cfg.task.decoding.batch_size == batch and cfg.objectives.loss == "ce"
        assert (cfg.optim.weight_decay, cfg.optim.clip_norm) == (0.01, 1.0)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_prompt_tuning_settings(name):
    """Spec-ext §10.3.1/§10.3.6: prefix length 100 in encoder and decoder, no reparameterisation, OFA's hard-coded
    prefix dropout 0.2; adapters of width 100; BitFit; ordinary recipes tune nothing of the kind."""
    pt = _load(name).model.prompt_tuning
    kind, length, adapter_dim = PROMPT.get(name, ("none", None, None))
    assert pt.kind == kind
    if kind == "prefix":
        assert (pt.length, pt.encoder, pt.decoder, pt.projection, pt.dropout) == (length, True, True, False, 0.2)
    if kind == "adapter":
        assert pt.adapter_dim == adapter_dim

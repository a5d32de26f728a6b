"""configs/finetune: the Gigaword and GLUE recipes (issue 11 §0) carry OFA's hyper-parameters. The expectations
are copied from spec §7.7/§7.8 and OFA's run_scripts (gigaword/train_gigaword.sh, glue/train_<task>.sh: the first
point of each grid, GPUs × batch × update_freq), not from the YAML files, so an edit that drifts fails here."""

from pathlib import Path

import pytest

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data.sample_text_tasks import write_text_corpus
from ofa_scale.training.config import load_training_config

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "configs" / "finetune"
BPE = REPO.parent / "shared" / "ofa-bpe"

# name: (task, lr, global batch, micro batch, epochs, validate interval, best metric)
GLUE = {
    "glue_cola_large": ("glue_cola", 1e-4, 2 * 16 * 4, 16, 5, 10, "mcc"),
    "glue_sst2_large": ("glue_sst2", 1e-4, 4 * 16 * 2, 16, 5, 50, "accuracy"),
    "glue_mrpc_large": ("glue_mrpc", 1e-4, 2 * 16 * 4, 16, 5, 10, "accuracy"),
    "glue_qqp_large": ("glue_qqp", 1e-4, 8 * 8 * 4, 8, 5, 1000, "accuracy"),
    "glue_mnli_large": ("glue_mnli", 1e-4, 8 * 8 * 4, 8, 5, 1000, "accuracy"),
    "glue_rte_large": ("glue_rte", 1e-4, 2 * 8 * 8, 8, 5, 10, "accuracy"),
    "glue_qnli_large": ("glue_qnli", 1e-4, 8 * 8 * 4, 8, 5, 500, "accuracy"),
}
GIGAWORD = {"gigaword_base": "ofa_base", "gigaword_large": "ofa_large"}


def _load(name, *overrides):
    return load_training_config(FINETUNE / f"{name}.yaml", list(overrides))


def _common(cfg, arch):
    assert cfg.model.arch == arch and cfg.model.pretrained
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.clip_norm) == ([0.9, 0.999], 1e-8,
                                                                                             0.01, 1.0)
    assert cfg.schedule.warmup_steps is None and cfg.schedule.warmup_ratio == pytest.approx(0.06)
    assert cfg.schedule.end_lr == 0.0 and cfg.train.steps == 0
    ov = cfg.model.overrides
    assert ov["encoder_drop_path_rate"] == ov["decoder_drop_path_rate"] == pytest.approx(0.1)
    assert ov["dropout"] == pytest.approx(0.1) and ov["attention_dropout"] == 0.0
    assert ov["resnet_drop_path_rate"] == 0.0
    # text only: OFA never runs (never updates) the ResNet on these tasks; embeddings are trained
    assert cfg.task.image_size == 16 and cfg.train.freeze_resnet
    assert not cfg.train.freeze_encoder_embedding and not cfg.train.freeze_decoder_embedding
    assert (cfg.train.ema_decay, cfg.objectives.drop_worst_ratio) == (0.0, 0.0)
    assert cfg.data.train and cfg.data.valid and cfg.data.tokenizer.kind == "gpt2-bpe"


def test_the_text_recipes_are_the_issue_contract():
    names = {p.stem for p in FINETUNE.glob("*.yaml") if p.stem.startswith(("glue_", "gigaword_"))}
    assert names == set(GLUE) | set(GIGAWORD)


@pytest.mark.parametrize("name", sorted(GLUE))
def test_glue_recipe_has_ofas_values(name):
    task, lr, gbs, mbs, epochs, valid, best = GLUE[name]
    cfg = _load(name)
    _common(cfg, "ofa_large")
    assert cfg.task.name == task and cfg.task.best_metric == best and cfg.task.valid_interval == valid
    assert cfg.optim.lr == pytest.approx(lr) and cfg.train.epochs == epochs
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (gbs, mbs)
    assert cfg.objectives.label_smoothing == 0.0
    assert (cfg.task.prompt_type, cfg.task.max_src_length, cfg.task.constrained_training) == ("src", 512, True)
    assert cfg.task.decoding.inference == "allcand"
    assert isinstance(cfg.task.extra["source_length"], int)


@pytest.mark.parametrize("name", sorted(GIGAWORD))
def test_gigaword_recipe_has_ofas_values(name):
    cfg = _load(name)
    _common(cfg, GIGAWORD[name])
    assert cfg.task.name == "gigaword" and cfg.task.best_metric == "rouge_l" and cfg.task.valid_interval == 2500
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.train.epochs == 6
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (4 * 64 * 2, 64)
    assert cfg.objectives.label_smoothing == pytest.approx(0.1)
    assert (cfg.task.prompt_type, cfg.task.max_src_length, cfg.task.max_tgt_length) == ("none", 512, 64)
    assert cfg.task.extra == {"noise_ratio": 0.2}
    d = cfg.task.decoding
    assert (d.inference, d.beam, d.lenpen, d.max_len_a, d.max_len_b, d.no_repeat_ngram_size) == ("beam", 6, 0.7,
                                                                                                 0.0, 32, 3)


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    """Shards of the sample text TSVs with at least one global batch of OFA's sizes (Gigaword: 512 rows)."""
    root = tmp_path_factory.mktemp("text_recipes")
    tsv = write_text_corpus(root / "tsv", rows=512, eval_rows=1, seed=3)
    out = {}
    for fmt in ("gigaword", "glue_sst2", "glue_mnli"):
        out[fmt] = root / fmt
        assert preprocess_main(["shards", "--format", fmt, "--input", str(tsv[f"{fmt}_train.tsv"]), "--out",
                                str(out[fmt]), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("name", ["gigaword_large", "glue_sst2_large", "glue_mnli_large"])
def test_check_builds_the_recipe_for_8_ranks(name, text_shards):
    """`ofa-train --check` (in process): workload, task and layout build with OFA's batch on 8 ranks."""
    from ofa_scale.training.check import check_config

    data = text_shards[_load(name).task.name]
    cfg = _load(name, f"data.train={data}", f"data.valid={data}", f"data.tokenizer.path={BPE}",
                "model.pretrained=null")
    report = check_config(cfg, 8)
    assert "config is valid for 8 process(es)" in report and "model: ofa_large (" in report

"""MuE early exit (model/early_exit.py): off = the full model bit for bit, always-exit = a hand-truncated model,
beam search keeps a consistent cache, and per-sample exits in a batch match one-at-a-time runs.

Random small model (fp32, math attention). Its layer-to-layer cosines sit between ~0.55 and ~0.9, so the
thresholds below are chosen inside gaps of the observed values (each test checks the exits it relies on happen).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ofa_scale.errors import ConfigError
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model import early_exit as ee
from ofa_scale.model.early_exit import EarlyExitConfig
from ofa_scale.model.generate import GenerationConfig, generate

PAD = 1


@pytest.fixture(scope="module")
def model() -> OFAModel:
    torch.manual_seed(0)
    cfg = OFAConfig.preset("ofa_tiny", attention_impl="math", d_model=64, ffn_dim=128, vocab_size=2000)
    return OFAModel(cfg).eval()


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(7)
    return dict(src_tokens=torch.tensor([[0, 11, 12, 13, 14, 2], [0, 21, 22, 2, PAD, PAD], [0, 31, 32, 33, 2, PAD]]),
                patch_images=torch.randn(3, 3, 32, 32, generator=g), patch_masks=torch.tensor([True, True, False]))


@pytest.fixture(autouse=True)
def _off(model):
    yield
    ee.enable(model, None)


def _run(model, batch, cfg: EarlyExitConfig | None, gen: GenerationConfig):
    ee.enable(model, cfg)
    out = generate(model, batch, gen)
    prev = torch.tensor([[0, 5, 6, 7]]).expand(len(batch["src_tokens"]), -1)  # a teacher-forced pass too
    logits = model(src_tokens=batch["src_tokens"], patch_images=batch["patch_images"],
                   patch_masks=batch["patch_masks"], prev_output_tokens=prev)
    ee.enable(model, None)
    return out, logits


def _same(a, b) -> None:
    assert len(a) == len(b)
    for ha, hb in zip(a, b):
        assert [h.tokens.tolist() for h in ha] == [h.tokens.tolist() for h in hb]
        assert [h.score for h in ha] == [h.score for h in hb]
        for x, y in zip(ha, hb):
            assert torch.equal(x.positional_scores, y.positional_scores)


def test_threshold_that_never_fires_is_the_full_model_bit_for_bit(model, batch):
    gen = GenerationConfig(beam_size=2, max_len_b=4)
    ref, ref_logits = _run(model, batch, None, gen)
    never = EarlyExitConfig(encoder=1.0, decoder=1.0)
    out, logits = _run(model, batch, never, gen)
    _same(ref, out)
    assert torch.equal(ref_logits, logits)
    assert never.stats.summary()["encoder_layers_fraction"] == 1.0
    assert never.stats.summary()["decoder_layers_fraction"] == 1.0


@pytest.mark.parametrize("kv_fill", ["copy", "hidden"])
def test_exit_at_layer_one_equals_a_one_layer_model(model, batch, kv_fill):
    gen = GenerationConfig(beam_size=2, max_len_b=4)
    always = EarlyExitConfig(encoder=-1.0, decoder=-1.0, schedule=False, kv_fill=kv_fill)
    out, logits = _run(model, batch, always, gen)
    assert always.stats.summary()["encoder_layers_mean"] == 1.0
    assert always.stats.summary()["decoder_layers_mean"] == 1.0

    short = copy.deepcopy(model)  # the same weights with only the first layer of each stack
    short.encoder.layers = short.encoder.layers[:1]
    short.decoder.layers = short.decoder.layers[:1]
    ref, ref_logits = _run(short, batch, None, gen)
    _same(ref, out)
    assert torch.equal(ref_logits, logits)


def test_mue_decoder_schedule():
    cfg = EarlyExitConfig(decoder=0.9)
    max_len = 16  # no exit while step < 17/3
    assert all(ee.decoder_threshold(cfg, t, max_len) == math.inf for t in range(6))
    assert ee.decoder_threshold(cfg, 6, max_len) == pytest.approx(0.81 + 0.1 * math.exp(-7 / 17))
    assert ee.decoder_threshold(cfg, 6, None) == 0.9  # teacher-forced pass: the fixed threshold
    assert ee.decoder_threshold(EarlyExitConfig(decoder=0.9, schedule=False), 0, max_len) == 0.9
    assert ee.decoder_threshold(EarlyExitConfig(decoder=1.0), 15, max_len) == math.inf  # 1.0 = never


def test_group_cosine_is_per_group_over_kept_tokens():
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    keep = torch.tensor([[True, True, False]] * 4)
    groups = torch.tensor([0, 0, 1, 1])
    cos = ee.group_cosine(new, old, groups, keep)
    a, b = new[:2, :2].flatten(), old[:2, :2].flatten()
    assert cos[0] == cos[1]
    assert cos[0].item() == pytest.approx((a @ b / (a.norm() * b.norm())).item(), rel=1e-6)


def test_beam_search_with_exits_on_some_beams_keeps_the_cache_consistent(model, batch, monkeypatch):
    """Samples decide on their own beams: at thresholds inside their cosine gaps some samples' beams exit while
    others run on. Every layer's self-attention cache must still hold one entry per decoded position for every
    row, and the cross-attention cache (once a layer has run) every encoder position for every row, whenever beam
    search reorders it."""
    subsets = []
    real_sub_cache = ee._sub_cache
    monkeypatch.setattr(ee, "_sub_cache", lambda cache, idx: subsets.append(idx.numel()) or real_sub_cache(cache,
                                                                                                           idx))
    checked = []
    decoder = model.decoder
    real_reorder = decoder.reorder_incremental_state

    def checking_reorder(state, order):
        steps = state["decoder.cached_steps"]
        rows = state[ee.GROUPS_KEY].shape[0]
        for i in range(len(decoder.layers)):
            layer = state[f"decoder.layers.{i}"]
            assert layer["self_attn"]["k"].shape[:3] == (rows, 4, steps)
            assert layer["self_attn"]["v"].shape == layer["self_attn"]["k"].shape
            if "k" in layer.get("encoder_attn", {}):  # made when the layer first runs (static: encoder output)
                assert layer["encoder_attn"]["k"].shape[:3] == (rows, 4, batch["src_tokens"].shape[1] + 4)
        checked.append(steps)
        return real_reorder(state, order)

    monkeypatch.setattr(decoder, "reorder_incremental_state", checking_reorder)
    for kv_fill in ("copy", "hidden"):
        cfg = EarlyExitConfig(encoder=0.785, decoder=0.78, schedule=False, kv_fill=kv_fill)
        ee.enable(model, cfg)
        out = generate(model, batch, GenerationConfig(beam_size=3, max_len_b=5))
        assert all(len(hyps) == 3 and all(h.tokens[-1] == 2 for h in hyps) for hyps in out)
        mean = cfg.stats.summary()["decoder_layers_mean"]
        assert 1.0 < mean < 4.0
    assert checked and any(0 < n < 9 for n in subsets)  # some calls ran a strict subset of the rows


def test_per_sample_exits_in_a_batch_match_one_at_a_time(model, batch):
    gen = GenerationConfig(beam_size=2, max_len_b=5)
    cfg = EarlyExitConfig(encoder=0.785, decoder=0.78, schedule=False)
    batched, batched_logits = _run(model, batch, cfg, gen)
    together = cfg.stats
    singles, enc_layers, dec_layers = [], [], []
    for b in range(3):
        length = int(batch["src_tokens"][b].ne(PAD).sum())
        one = {"src_tokens": batch["src_tokens"][b:b + 1, :length], "patch_images": batch["patch_images"][b:b + 1],
               "patch_masks": batch["patch_masks"][b:b + 1]}
        single = EarlyExitConfig(encoder=0.785, decoder=0.78, schedule=False)
        out, logits = _run(model, one, single, gen)
        singles.append(out[0])
        enc_layers.append(single.stats.layers["encoder"])
        dec_layers.append(single.stats.layers["decoder"])
        torch.testing.assert_close(logits[0], batched_logits[b], rtol=1e-4, atol=1e-4)
    assert len(set(enc_layers)) > 1  # the samples exit the encoder at different layers
    assert together.layers["encoder"] == sum(enc_layers)
    assert together.layers["decoder"] == sum(dec_layers)
    for hyps_b, hyps_1 in zip(batched, singles):
        assert [h.tokens.tolist() for h in hyps_b] == [h.tokens.tolist() for h in hyps_1]
        assert [h.score for h in hyps_b] == pytest.approx([h.score for h in hyps_1], abs=1e-4)


def test_parse_and_validate():
    both = EarlyExitConfig.parse("0.95")
    assert (both.image, both.text, both.decoder, both.schedule, both.kv_fill) == (0.95, 0.95, 0.95, True, "copy")
    keyed = EarlyExitConfig.parse("encoder=0.99, decoder=0.7,schedule=off,kv_fill=hidden")
    assert (keyed.image, keyed.text, keyed.decoder, keyed.schedule, keyed.kv_fill) == (0.99, 0.99, 0.7, False,
                                                                                         "hidden")
    mue = EarlyExitConfig.parse("img=0.99,txt=0.7,decoder=0.9")  # MuE's caption evaluation (spec ext §10.7.4)
    assert (mue.image, mue.text, mue.decoder) == (0.99, 0.7, 0.9)
    assert EarlyExitConfig(encoder=0.5).image == EarlyExitConfig(encoder=0.5).text == 0.5
    for bad in ("fast", "encoder=2", "img=1.5", "depth=3", "kv_fill=zero", "schedule=maybe"):
        with pytest.raises(ConfigError):
            EarlyExitConfig.parse(bad)


def _saved_two_layer_model(bpe_dir, tmp_path):
    """A tiny random model with 2 layers per stack (so an exit skips one), saved as an ofa-scale model dir."""
    from ofa_scale.data.tokenizer import load_tokenizer
    from ofa_scale.model.checkpoint import save_pretrained

    torch.manual_seed(0)
    tok = load_tokenizer("gpt2-bpe", str(bpe_dir))
    model = OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=len(tok), d_model=32, ffn_dim=64, heads=2,
                                      encoder_layers=2, decoder_layers=2)).eval()
    return save_pretrained(model, tmp_path / "model")


def test_ofa_eval_run_early_exit_records_the_layers_run(tmp_path, monkeypatch, capsys):
    """`ofa-eval run --early-exit`: decoding exits (the always-firing threshold leaves one encoder layer) and
    metrics.json records the layers run; a malformed threshold is refused in one sentence."""
    import json

    import yaml

    from ofa_scale.cli.evaluate import main
    from ofa_scale.finetune import task as task_module
    from tests.finetune.engine_data import BPE_DIR, caption_shards, finetune_config
    from tests.finetune.engine_fake_task import install

    monkeypatch.setattr(task_module, "_REGISTRY", dict(task_module._REGISTRY))
    install()
    model_dir = _saved_two_layer_model(BPE_DIR, tmp_path)
    valid = caption_shards(tmp_path, "valid", 3)
    cfg = finetune_config(valid, valid, task={"decoding": {"beam": 2, "max_len_b": 2, "batch_size": 2}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    args = ["run", "--config", str(recipe), "--checkpoint", str(model_dir), "--data", str(valid)]
    assert main([*args, "--out", str(tmp_path / "out"), "--early-exit", "encoder=-1,decoder=-1,schedule=off"]) == 0
    recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())["early_exit"]
    assert recorded["image"] == recorded["text"] == -1.0 and recorded["schedule"] is False
    assert recorded["encoder_layers_mean"] == 1.0 and recorded["decoder_layers_mean"] == 1.0
    assert "early exit" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "o2"), "--early-exit", "fast"]) == 2
    assert "--early-exit 'fast'" in capsys.readouterr().err
    # a MuE recipe: its model.overrides.mue decomposes the checkpoint's encoder and its task.early_exit is the
    # default (MuE's per-stream thresholds); --early-exit off evaluates the full model
    cfg["model"]["overrides"]["mue"] = True
    cfg["task"]["early_exit"] = "img=-1,txt=1,decoder=1"
    recipe.write_text(yaml.safe_dump(cfg))
    assert main([*args, "--out", str(tmp_path / "o3")]) == 0
    recorded = json.loads((tmp_path / "o3" / "metrics.json").read_text())["early_exit"]
    assert (recorded["image"], recorded["text"], recorded["decoder"]) == (-1.0, 1.0, 1.0)
    assert recorded["image_layers_mean"] == 1.0 and recorded["text_layers_mean"] == 2.0
    assert "encoder_layers_mean" not in recorded
    assert main([*args, "--out", str(tmp_path / "o4"), "--early-exit", "off"]) == 0
    assert "early_exit" not in json.loads((tmp_path / "o4" / "metrics.json").read_text())


def test_ofa_predict_early_exit_reports_the_layers_run(bpe_dir, tmp_path, capsys):
    from PIL import Image

    from ofa_scale.predict.cli import main

    model_dir = _saved_two_layer_model(bpe_dir, tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (90 * i, 120, 200)).save(images / f"img{i}.png")
    out = tmp_path / "captions.jsonl"
    argv = ["--model", str(model_dir), "--tokenizer-path", str(bpe_dir), "--task", "caption", "--input",
            str(images), "--out", str(out), "--set", "image_size=64", "--set", "decoding.beam=2",
            "--set", "decoding.max_len_b=3"]
    assert main([*argv, "--early-exit", "-1"]) == 0
    assert len(out.read_text().splitlines()) == 2
    err = capsys.readouterr().err
    assert "early exit" in err and "'encoder_layers_mean': 1.0" in err
    assert main([*argv, "--early-exit", "encoder=1.5"]) == 2
    assert "must be a cosine" in capsys.readouterr().err

    # without the flag a recipe's task.early_exit applies, and its model.overrides.mue decomposes the encoder (the
    # per-stream thresholds need it), as in `ofa-eval run`; --early-exit off runs the full model
    import yaml

    from ofa_scale.predict.tasks import RECIPES_DIR

    recipe_cfg = yaml.safe_load((RECIPES_DIR / "caption_stage1_base.yaml").read_text())
    recipe_cfg["model"].setdefault("overrides", {})["mue"] = True
    recipe_cfg["task"]["early_exit"] = "img=-1,txt=1,decoder=1"
    recipe = tmp_path / "mue_recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_cfg))
    assert main([*argv, "--recipe", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "'image_layers_mean': 1.0" in err and "'text_layers_mean': 2.0" in err
    assert "encoder_layers_mean" not in err
    assert main([*argv, "--recipe", str(recipe), "--early-exit", "off"]) == 0
    assert "early exit" not in capsys.readouterr().err
    # a --set of the task section's early_exit is the recipe's value too (joint encoder: one threshold)
    assert main([*argv, "--set", "early_exit=encoder=-1,decoder=1"]) == 0
    assert "'encoder_layers_mean': 1.0" in capsys.readouterr().err

"""Prefix tuning through the real trainer (`ofa-train`, the engine tests' fake caption task) on a saved base model:
after the run every base weight and BatchNorm statistic in the checkpoint is bit-identical to the base and the
prefix moved; each checkpoint carries a prompt checkpoint (the tuned tensors alone + the base's path and content
hash) that rebuilds exactly the trained model and is refused, in one sentence, on a changed base; `ofa-eval run`
evaluates a prompt-tuned run through it; a resume refuses a base that changed; and 2-rank ZeRO-3 and tp=2 runs
follow the single process's loss trajectory and write the same prompt checkpoint (about 20 s each)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.finetune.engine_data import caption_shards, finetune_config, launch, read_metrics, write_config

pytestmark = pytest.mark.timeout(900)

PROMPT = {"kind": "prefix", "length": 2, "dropout": 0.0}  # dropout 0: other layouts draw other masks
BASE_SEED = 11  # the base's weights differ from the run's own initial ones (train.seed 7)


def run_config(root, train, valid, base, **parallel) -> dict:
    return finetune_config(train, valid, model={"pretrained": str(base), "prompt_tuning": PROMPT},
                           train={"epochs": 2, "global_batch_size": 4, "micro_batch_size": 2, "ckpt_interval": 100},
                           optim={"lr": 0.05}, parallel={"zero_stage": 1, **parallel})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ofa_scale.model.checkpoint import save_pretrained
    from ofa_scale.model.init import init_weights
    from ofa_scale.model.ofa import OFAModel
    from ofa_scale.training.config import load_training_config
    from ofa_scale.training.workload import tokenizer_and_model_config

    root = tmp_path_factory.mktemp("prompt_run")
    train, valid = caption_shards(root, "train", 8), caption_shards(root, "valid", 4)
    plain = write_config(root / "plain.yaml", finetune_config(train, valid))
    _, model_config = tokenizer_and_model_config(load_training_config(plain))
    base = OFAModel(model_config)
    init_weights(base, BASE_SEED)
    save_pretrained(base, root / "base")
    config = write_config(root / "prefix.yaml", run_config(root, train, valid, root / "base"))
    run = root / "run1"
    launch("train", "--config", str(config), "--run-dir", str(run), timeout=600)
    return {"root": root, "train": train, "valid": valid, "base": root / "base", "config": config, "run": run}


def last_tag(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_base_weights_are_bit_identical_and_the_prefix_moved(setup):
    from safetensors.torch import load_file

    from ofa_scale.model.init import InitialWeights
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader
    from ofa_scale.training.config import load_training_config
    from ofa_scale.training.workload import tokenizer_and_model_config

    metrics = read_metrics(setup["run"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    base = load_file(str(setup["base"] / "model.safetensors"))
    trained = CanonicalReader(last_tag(setup["run"]) / "canonical").view(MODEL)
    names = set(trained.names())
    prefix = {n for n in names if ".prefix." in n}
    assert len(prefix) == 4 and names - prefix == set(base)  # ResNet BN statistics included
    for name in names - prefix:
        assert torch.equal(trained.read(name), base[name]), f"base {name} changed"
    cfg = load_training_config(setup["config"])
    _, model_config = tokenizer_and_model_config(cfg)
    initial = InitialWeights(model_config, cfg.train.seed)  # what the run built before loading the base
    assert not torch.equal(initial["decoder.layers.0.fc1.weight"], base["decoder.layers.0.fc1.weight"])
    for name in prefix:
        assert not torch.equal(trained.read(name), initial[name]), f"{name} did not move"


def test_the_prompt_checkpoint_holds_only_the_prefix_and_rebuilds_the_trained_model(setup):
    from ofa_scale.evaluation.model_source import load_eval_model
    from ofa_scale.finetune.prompt_checkpoint import content_hash, load_prompt_model, prompt_dir

    tag = last_tag(setup["run"])
    meta = json.loads((prompt_dir(tag) / "prompt.json").read_text())
    assert meta["method"] == "prefix" and meta["tensors"] == 4 and meta["parameters"] == 4 * 2 * 32
    assert meta["base"]["path"] == str(setup["base"].resolve())
    assert meta["base"]["sha256"] == content_hash(setup["base"])
    assert (prompt_dir(tag) / "prompt.safetensors").stat().st_size < 4096
    rebuilt = load_prompt_model(tag).state_dict()
    full = load_eval_model(tag).model.state_dict()  # the run's own full copy (canonical/)
    assert set(rebuilt) == set(full)
    for name, value in full.items():
        assert torch.equal(rebuilt[name], value), name


def test_a_changed_base_is_refused_in_one_sentence(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    from ofa_scale.errors import UserError
    from ofa_scale.finetune.weights import load_run_eval_model

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    base = tmp_path / "base"
    shutil.copytree(setup["base"], base)
    for meta_file in run.glob("checkpoints/step_*/prompt/prompt.json"):
        meta = json.loads(meta_file.read_text())
        meta["base"].update(path=str(base), resolved=str(base))
        meta_file.write_text(json.dumps(meta))
    assert load_run_eval_model(run).description["kind"] == "prompt"  # an identical copy is accepted
    weights = load_file(str(base / "model.safetensors"))
    weights["decoder.layers.0.fc1.bias"][0] += 1e-3
    save_file(weights, str(base / "model.safetensors"))
    with pytest.raises(UserError) as err:
        load_run_eval_model(run)
    message = str(err.value)
    assert "trained on a base model with SHA-256" in message and "\n" not in message
    shutil.rmtree(base)
    with pytest.raises(UserError, match="no longer exists"):
        load_run_eval_model(run)


def test_ofa_eval_run_evaluates_the_prompt_checkpoint(setup, tmp_path):
    out = tmp_path / "eval"
    launch("eval", "run", "--config", str(setup["config"]), "--checkpoint", str(setup["run"]), "--data",
           str(setup["valid"]), "--out", str(out))
    result = json.loads((out / "metrics.json").read_text())
    assert result["checkpoint"]["kind"] == "prompt" and result["checkpoint"]["method"] == "prefix"
    best = json.loads((setup["run"] / "best.json").read_text())
    valid = next(m for m in read_metrics(setup["run"]) if m["step"] == best["step"])
    for key in ("match", "length", "first"):  # the validation the trainer ran on the same weights
        assert result[key] == pytest.approx(valid[f"valid/{key}"], rel=1e-6)


@pytest.mark.parametrize("name,nproc,parallel", [("zero3", 2, {"zero_stage": 3}), ("tp2", 2, {"tp": 2})])
def test_two_rank_prompt_tuning_follows_the_single_process(setup, tmp_path, name, nproc, parallel):
    from safetensors.torch import load_file

    config = write_config(tmp_path / f"{name}.yaml",
                          run_config(setup["root"], setup["train"], setup["valid"], setup["base"], **parallel))
    run = tmp_path / name
    launch("train", "--config", str(config), "--run-dir", str(run), nproc=nproc, timeout=600)
    one, two = read_metrics(setup["run"]), read_metrics(run)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    mine = load_file(str(last_tag(run) / "prompt" / "prompt.safetensors"))
    ref = load_file(str(last_tag(setup["run"]) / "prompt" / "prompt.safetensors"))
    assert set(mine) == set(ref)
    for key, value in ref.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-6)


def test_a_resume_refuses_a_base_that_changed_since_the_run_started(setup, tmp_path):
    """The base is changed in place (the checkpoint's manifest forbids editing its prompt.json) and restored after."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    weights_file = setup["base"] / "model.safetensors"
    original = weights_file.read_bytes()
    try:
        weights = load_file(str(weights_file))
        weights["encoder.layers.0.fc2.bias"][0] += 1e-3
        save_file(weights, str(weights_file))
        proc = launch("train", "--config", str(setup["config"]), "--run-dir", str(run), "--resume", "--set",
                      "train.epochs=3", check=False)
    finally:
        weights_file.write_bytes(original)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "was trained on a base model with SHA-256" in out and "Traceback" not in out
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]  # nothing trained on the changed base


@pytest.mark.parametrize("prompt", [{"kind": "adapter", "adapter_dim": 4}, {"kind": "bitfit"}])
def test_adapter_and_bitfit_runs_train_and_store_only_their_parameters(setup, tmp_path, prompt):
    from safetensors.torch import load_file

    from ofa_scale.model.init import InitialWeights
    from ofa_scale.model.prompt_tuning import trainable
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader
    from ofa_scale.training.config import load_training_config
    from ofa_scale.training.workload import tokenizer_and_model_config

    cfg = run_config(setup["root"], setup["train"], setup["valid"], setup["base"])
    cfg["model"]["prompt_tuning"] = prompt
    cfg["train"]["steps"] = 2
    run = tmp_path / "run"
    launch("train", "--config", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run), timeout=600)
    base = load_file(str(setup["base"] / "model.safetensors"))
    loaded = load_training_config(run / "config.yaml")
    initial = InitialWeights(tokenizer_and_model_config(loaded)[1], loaded.train.seed)
    tag = last_tag(run)
    trained = CanonicalReader(tag / "canonical").view(MODEL)
    tuned = {n for n in trained.names() if trainable(n, prompt["kind"])}
    stored = load_file(str(tag / "prompt" / "prompt.safetensors"))
    assert set(stored) == tuned and tuned
    for name in trained.names():
        if name in tuned:
            assert torch.equal(stored[name], trained.read(name))
            start = base[name] if name in base else initial[name]  # adapters: their initial values
            assert not torch.equal(trained.read(name), start), f"{name} did not move"
        else:
            assert torch.equal(trained.read(name), base[name]), f"base {name} changed"

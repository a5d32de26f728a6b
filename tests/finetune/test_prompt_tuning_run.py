"""Prefix tuning through the real trainer (`ofa-train`, the engine tests' fake caption task) on a saved base model:
every checkpoint holds the tuned parameters alone — no file of it (DeepSpeed's, the layout-free copy, the prompt
checkpoint) holds a base tensor — plus the base's path and content hash, and the prefix moved; the prompt checkpoint
rebuilds the trained model and is refused, in one sentence, on a changed base unless an identical copy is named
(`--set model.pretrained=COPY`, ofa-predict `--base-model`); `ofa-eval run` evaluates a prompt-tuned run through it;
a resume rebuilds the base from its recorded path and continues exactly like the uninterrupted run (EMA of the prefix
included), or refuses a base that changed (an identical copy resumes), or DeepSpeed files that lack a tuned
parameter; 2-rank ZeRO-3 and tp=2 runs, stopped and resumed, follow the single process's loss trajectory and write
the same prompt checkpoint, and a ZeRO-3 checkpoint resumes under tp=2 (about 20 s each)."""

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


def saved_tensors(tag_dir) -> dict[str, torch.Tensor]:
    """Every tensor in every file of a checkpoint directory, by file and key path."""
    from safetensors.torch import load_file

    found = {}

    def walk(where, value):
        if isinstance(value, torch.Tensor):
            found[where] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{where}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{where}/{i}", v)

    for f in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
        rel = f.relative_to(tag_dir).as_posix()
        if f.suffix == ".safetensors":
            walk(rel, load_file(str(f)))
        elif f.suffix == ".pt":
            walk(rel, torch.load(f, map_location="cpu", weights_only=False))
    return found


def test_no_checkpoint_file_holds_a_base_tensor(setup):
    """DeepSpeed's files, the layout-free copy and the prompt checkpoint: only the prefix (its fp32 value and Adam
    moments), a few hundred numbers against the base's millions; the directory is a sliver of the base's size."""
    from safetensors.torch import load_file

    tag = last_tag(setup["run"])
    base = load_file(str(setup["base"] / "model.safetensors"))
    prompt_params = 4 * 2 * 32
    tensors = saved_tensors(tag)
    assert any(k.startswith("mp_rank_00_model_states.pt/module/") for k in tensors)
    for key in tensors:
        assert not any(key.endswith(name) for name in base), f"{key} is a base tensor"
        if key.startswith("mp_rank_00_model_states.pt/module/") or key.endswith(".safetensors"):
            assert ".prefix." in key, key
    floats = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    # prompt/ (1) + canonical/ (value, 2 moments) + DeepSpeed (module, fp32 master, 2 moments), + Adam's step
    assert floats <= 8 * prompt_params + 1 < sum(t.numel() for t in base.values()) // 1000
    size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
    assert size < (setup["base"] / "model.safetensors").stat().st_size // 100


def test_the_checkpoint_holds_the_prefix_alone_and_it_moved(setup):
    from ofa_scale.model.init import InitialWeights
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader
    from ofa_scale.training.config import load_training_config
    from ofa_scale.training.workload import tokenizer_and_model_config

    metrics = read_metrics(setup["run"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    trained = CanonicalReader(last_tag(setup["run"]) / "canonical").view(MODEL)
    prefix = set(trained.names())
    assert len(prefix) == 4 and all(".prefix." in n for n in prefix)
    cfg = load_training_config(setup["config"])
    _, model_config = tokenizer_and_model_config(cfg)
    initial = InitialWeights(model_config, cfg.train.seed)  # what the run built before loading the base
    for name in prefix:
        assert not torch.equal(trained.read(name), initial[name]), f"{name} did not move"


def test_the_prompt_checkpoint_holds_only_the_prefix_and_rebuilds_the_trained_model(setup, tmp_path):
    from ofa_scale.evaluation.model_source import load_eval_model
    from ofa_scale.finetune.prompt_checkpoint import content_hash, load_prompt_model, prompt_dir

    tag = last_tag(setup["run"])
    meta = json.loads((prompt_dir(tag) / "prompt.json").read_text())
    assert meta["method"] == "prefix" and meta["tensors"] == 4 and meta["parameters"] == 4 * 2 * 32
    assert meta["base"]["path"] == str(setup["base"].resolve())
    assert meta["base"]["sha256"] == content_hash(setup["base"])
    assert (prompt_dir(tag) / "prompt.safetensors").stat().st_size < 4096
    from safetensors.torch import load_file

    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader

    rebuilt = load_prompt_model(tag).state_dict()
    assert load_eval_model(tag).description["kind"] == "prompt"  # a step dir is read through it too
    trained = CanonicalReader(tag / "canonical").view(MODEL)
    base = load_file(str(setup["base"] / "model.safetensors"))
    for name, value in rebuilt.items():  # the base's tensors, then the trained ones over them
        expected = trained.read(name) if name in trained else base.get(name)
        if expected is not None:
            assert torch.equal(value, expected), name
    assert set(trained.names()) | set(base) <= set(rebuilt)
    from ofa_scale.model.checkpoint import load_pretrained
    from ofa_scale.parallel.export_cli import export

    exported = load_pretrained(export(tag, tmp_path / "exported")).state_dict()  # ofa-convert export: base + prefix
    for name, value in rebuilt.items():
        assert torch.equal(exported[name], value), name


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
    assert "which now hashes to" in message and "--set model.pretrained=PATH" in message and "\n" not in message
    # the original base named as the copy: accepted, and what the description reports
    loaded = load_run_eval_model(run, base=str(setup["base"]))
    assert loaded.description["base"] == str(setup["base"].resolve())
    shutil.rmtree(base)
    with pytest.raises(UserError, match="which no longer exists; restore it there or pass an identical copy"):
        load_run_eval_model(run)


def test_a_moved_base_is_found_through_an_identical_copy_and_refused_otherwise(setup, tmp_path):
    """The recorded base is gone: `ofa-eval run --set model.pretrained=COPY` (and ofa-predict's --base-model, the
    same call) evaluates with an identical copy; a copy with other content is refused in one sentence."""
    from safetensors.torch import load_file, save_file

    from ofa_scale.errors import UserError
    from ofa_scale.finetune.weights import load_run_eval_model

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    for meta_file in run.glob("checkpoints/step_*/prompt/prompt.json"):  # as if the base had lived elsewhere
        meta = json.loads(meta_file.read_text())
        meta["base"].update(path=str(tmp_path / "gone"), resolved=str(tmp_path / "gone"))
        meta_file.write_text(json.dumps(meta))
    copy = tmp_path / "copy"
    shutil.copytree(setup["base"], copy)
    out = tmp_path / "eval"
    launch("eval", "run", "--config", str(setup["config"]), "--checkpoint", str(run), "--data", str(setup["valid"]),
           "--out", str(out), "--set", f"model.pretrained={copy}")
    result = json.loads((out / "metrics.json").read_text())
    assert result["checkpoint"]["base"] == str(copy.resolve())
    best = json.loads((setup["run"] / "best.json").read_text())
    valid = next(m for m in read_metrics(setup["run"]) if m["step"] == best["step"])
    for key in ("match", "length", "first"):  # the same weights as the run's own validation
        assert result[key] == pytest.approx(valid[f"valid/{key}"], rel=1e-6)
    weights = load_file(str(copy / "model.safetensors"))
    weights["decoder.layers.0.fc1.bias"][0] += 1e-3
    save_file(weights, str(copy / "model.safetensors"))
    with pytest.raises(UserError) as err:
        load_run_eval_model(run, base=str(copy), base_hint="--base-model PATH")
    message = str(err.value)
    assert "which no longer exists, and" in message and "hashes to" in message and "not the same" in message
    assert "--base-model PATH" in message and "\n" not in message


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


def assert_follows(reference, run, rel=1e-5):
    one, two = read_metrics(reference), read_metrics(run)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for a, b in zip(one, two):
        if rel == 0:  # bit-identical
            assert (b["loss"], b["grad_norm"]) == (a["loss"], a["grad_norm"]), a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=10 * rel), a["step"]


def test_a_resume_rebuilds_the_base_and_continues_exactly(setup, tmp_path):
    """Stopped after update 2 of 4, resumed from the trained-only checkpoint: the same numbers as the
    uninterrupted run (loader position, prefix, Adam moments, schedule and RNG came back; the base from its path)."""
    run = tmp_path / "run"
    launch("train", "--config", str(setup["config"]), "--run-dir", str(run), "--stop-after", "2")
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    proc = launch("train", "--config", str(setup["config"]), "--run-dir", str(run), "--resume")
    assert f"on the frozen base {(setup['base']).resolve()}" in proc.stdout
    assert_follows(setup["run"], run, rel=0)


def test_ema_averages_the_prefix_alone_resumes_exactly_and_is_what_the_prompt_checkpoint_keeps(setup, tmp_path):
    from safetensors.torch import load_file

    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader

    cfg = run_config(setup["root"], setup["train"], setup["valid"], setup["base"])
    cfg["train"]["ema_decay"] = 0.5
    config = write_config(tmp_path / "ema.yaml", cfg)
    whole, run = tmp_path / "whole", tmp_path / "run"
    launch("train", "--config", str(config), "--run-dir", str(whole))
    launch("train", "--config", str(config), "--run-dir", str(run), "--stop-after", "2")
    launch("train", "--config", str(config), "--run-dir", str(run), "--resume")
    assert_follows(whole, run, rel=0)
    for a, b in zip(read_metrics(whole), read_metrics(run)):  # validation on the EMA weights: they came back
        assert {k: v for k, v in a.items() if k.startswith("valid/")} == \
            {k: v for k, v in b.items() if k.startswith("valid/")}
    tag = last_tag(run)
    base = load_file(str(setup["base"] / "model.safetensors"))
    tensors = saved_tensors(tag)
    assert not [k for k in tensors if any(k.endswith(name) for name in base)]
    assert sum(t.numel() for t in tensors.values() if t.is_floating_point()) <= 10 * 4 * 2 * 32 + 1
    ema, live = (CanonicalReader(tag / d).view(MODEL) for d in ("ema", "canonical"))
    stored = load_file(str(tag / "prompt" / "prompt.safetensors"))
    assert set(stored) == set(ema.names()) == set(live.names()) and len(stored) == 4
    for name, value in stored.items():
        assert torch.equal(value, ema.read(name)) and not torch.equal(value, live.read(name)), name
    assert json.loads((tag / "prompt" / "prompt.json").read_text())["weights"] == "ema"


@pytest.mark.parametrize("name,nproc,parallel", [("zero3", 2, {"zero_stage": 3}), ("tp2", 2, {"tp": 2})])
def test_two_rank_prompt_tuning_follows_the_single_process(setup, tmp_path, name, nproc, parallel):
    """Stopped after update 2 and resumed from DeepSpeed's trained-only files under the same layout; the ZeRO-3
    checkpoint of update 2 also resumes under tp=2 (through the trained-only layout-free copy)."""
    from safetensors.torch import load_file

    config = write_config(tmp_path / f"{name}.yaml",
                          run_config(setup["root"], setup["train"], setup["valid"], setup["base"], **parallel))
    run = tmp_path / name
    launch("train", "--config", str(config), "--run-dir", str(run), "--stop-after", "2", nproc=nproc, timeout=600)
    if name == "zero3":
        moved = tmp_path / "zero3_to_tp2"
        shutil.copytree(run, moved)
    launch("train", "--config", str(config), "--run-dir", str(run), "--resume", nproc=nproc, timeout=600)
    assert_follows(setup["run"], run)
    tensors = saved_tensors(last_tag(run))  # every rank's files: still only the prefix's few hundred numbers
    for key in tensors:
        assert "module/" not in key or ".prefix." in key, key
    assert sum(t.numel() for t in tensors.values() if t.is_floating_point()) <= 8 * 4 * 2 * 32 + nproc
    if name == "zero3":
        launch("train", "--config", str(config), "--run-dir", str(moved), "--resume", "--set", "parallel.tp=2",
               "--set", "parallel.zero_stage=1", nproc=2, timeout=600)
        assert_follows(setup["run"], moved)
    mine = load_file(str(last_tag(run) / "prompt" / "prompt.safetensors"))
    ref = load_file(str(last_tag(setup["run"]) / "prompt" / "prompt.safetensors"))
    assert set(mine) == set(ref)
    for key, value in ref.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-6)


def test_a_resume_refuses_a_base_that_changed_since_the_run_started_unless_given_an_identical_copy(setup, tmp_path):
    """The base is changed in place (the checkpoint's manifest forbids editing its prompt.json) and restored after;
    meanwhile `--set model.pretrained=COPY` of the original resumes, and later checkpoints record the copy."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    copy = tmp_path / "copy"
    shutil.copytree(setup["base"], copy)
    weights_file = setup["base"] / "model.safetensors"
    original = weights_file.read_bytes()
    resume = ["train", "--config", str(setup["config"]), "--run-dir", str(run), "--resume", "--set", "train.epochs=3"]
    try:
        weights = load_file(str(weights_file))
        weights["encoder.layers.0.fc2.bias"][0] += 1e-3
        save_file(weights, str(weights_file))
        proc = launch(*resume, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "which now hashes to" in out and "Traceback" not in out
        assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]  # nothing trained on the changed base
        proc = launch(*resume, "--set", f"model.pretrained={copy}")
    finally:
        weights_file.write_bytes(original)
    assert f"on the frozen base {copy.resolve()}" in proc.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((last_tag(run) / "prompt" / "prompt.json").read_text())["base"]["path"] == str(copy.resolve())


def test_a_same_layout_resume_refuses_deepspeeds_files_without_a_tuned_parameter(setup, tmp_path):
    """DeepSpeed loads a trained-only checkpoint non-strictly; a tuned parameter missing from its module state
    (here dropped, the manifest rewritten as if the checkpoint had been written so) is refused in one sentence
    instead of resuming with that parameter at its initial value."""
    from ofa_scale.training.checkpoint_integrity import write_manifest

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    tag = last_tag(run)
    (states_file,) = tag.glob("mp_rank_*_model_states.pt")
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    dropped = sorted(states["module"])[0]
    assert ".prefix." in dropped
    del states["module"][dropped]
    torch.save(states, states_file)
    write_manifest(tag)
    proc = launch("train", "--config", str(setup["config"]), "--run-dir", str(run), "--resume", "--set",
                  "train.epochs=3", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert f"lacks 1 of the 4 parameters this run trains ({dropped})" in out
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]


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
    tuned = {n for n in initial if trainable(n, prompt["kind"])}
    stored = load_file(str(tag / "prompt" / "prompt.safetensors"))
    assert set(stored) == set(trained.names()) == tuned and tuned  # the layout-free copy holds them alone too
    for name in trained.names():
        assert torch.equal(stored[name], trained.read(name))
        start = base[name] if name in base else initial[name]  # adapters: their initial values
        assert not torch.equal(trained.read(name), start), f"{name} did not move"

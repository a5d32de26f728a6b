"""ofa-eval and ofa-convert name what is wrong with the path they were given: a run without checkpoints, a step
that does not exist, a path that does not exist, a non-empty --out; and a file that is not a checkpoint."""

from __future__ import annotations

import pytest

from ofa_scale.cli.convert_ckpt import main as convert_main
from ofa_scale.errors import UserError
from ofa_scale.evaluation.model_source import load_eval_model


def _run_without_checkpoints(root):
    root.mkdir(parents=True)
    (root / "config.yaml").write_text("model: {arch: ofa_tiny}\n")
    (root / "metrics.jsonl").write_text("")  # killed before its first checkpoint
    return root


def test_a_run_without_checkpoints_is_named_as_such(tmp_path, capsys):
    run = _run_without_checkpoints(tmp_path / "run")
    for path in (run, run / "checkpoints"):
        with pytest.raises(UserError, match=r"is an ofa-train run directory with no published checkpoint yet "
                                            r"\(no checkpoints/latest\); let it train to its first checkpoint"):
            load_eval_model(path)
    assert convert_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is an ofa-train run directory with no published checkpoint yet" in err and "\n" not in err.strip()
    # a step directory that a kill left unpublished is offered instead
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    with pytest.raises(UserError, match=r"pass one of its step directories \(step_000010\)"):
        load_eval_model(run)


def test_a_step_that_does_not_exist_lists_the_runs_checkpoints(tmp_path, capsys):
    run = _run_without_checkpoints(tmp_path / "run")
    (run / "checkpoints" / "step_000005").mkdir(parents=True)
    missing = run / "checkpoints" / "step_000007"
    with pytest.raises(UserError, match=r"step_000007 does not exist in run .*; its checkpoints are step_000005"):
        load_eval_model(missing)
    assert convert_main(["export", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert "its checkpoints are step_000005" in capsys.readouterr().err


def test_nonexistent_paths_say_what_to_pass(tmp_path, capsys):
    assert convert_main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ofa-convert: error:") and "nope does not exist; pass an ofa-train run directory" in err
    with pytest.raises(UserError, match="does not exist; pass a model directory, a .pt checkpoint or an ofa-train"):
        load_eval_model(tmp_path / "nope")


@pytest.mark.parametrize("command", ["import-ofa", "export"])
def test_a_non_empty_out_is_refused_before_any_work(tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"earlier results")
    assert convert_main([command, str(tmp_path / "whatever.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output directory {out} is not empty; choose an empty or new --out" in err
    assert (out / "model.safetensors").read_bytes() == b"earlier results"
    (tmp_path / "file_out").write_text("")
    assert convert_main([command, str(tmp_path / "whatever.pt"), "--out", str(tmp_path / "file_out")]) == 2
    assert "is a file; choose an empty or new --out directory" in capsys.readouterr().err


def test_import_of_a_file_that_is_not_a_checkpoint_says_what_it_is_not(tmp_path, capsys):
    import random

    junk = tmp_path / "random.pt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    assert convert_main(["import-ofa", str(junk), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a torch checkpoint: it is neither a zip archive (what torch.save writes) nor a legacy torch " \
           "file" in err
    assert "weights_only" not in err

"""End-to-end trainer runs on the real pipeline (shards → loader → objectives → OFA → DeepSpeed), tiny sizes.

One uninterrupted single-process ZeRO-3 run is the reference for both properties:
- 2 processes under ZeRO-3 with the same global batch give the same losses (1e-4 relative, fp32);
- stopping after 4 steps and resuming from the checkpoint gives exactly the same later losses, in the same mlflow run.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.train.conftest import read_metrics, run_train, tiny_config, write_config

pytestmark = pytest.mark.timeout(600)

TASKS = ("caption", "vqa", "grounding", "grounded_caption", "itm", "detection", "image_infill", "text_infill")


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("train_ref")
    config = write_config(work / "tiny.yaml", tiny_config(tiny_data))
    run_dir = work / "ref"
    run_train(config, run_dir)
    return config, run_dir, read_metrics(run_dir)


def test_reference_run_writes_every_metric_and_a_final_checkpoint(reference):
    _, run_dir, metrics = reference
    assert [m["step"] for m in metrics] == list(range(1, 11))
    for m in metrics:
        for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "skipped_steps"):
            assert key in m, key
        assert m["skipped_steps"] == 0
        assert m["loss"] > 0 and m["grad_norm"] > 0
    # per-batch mixing: the auxiliary objectives are in every step; every objective shows up within 10 steps
    for task in ("detection", "image_infill", "text_infill"):
        assert all(f"loss/{task}" in m for m in metrics), task
    for task in TASKS:
        seen = [m for m in metrics if f"loss/{task}" in m]
        assert seen, task
        assert all(0.0 <= m[f"acc/{task}"] <= 1.0 and m[f"loss/{task}"] > 0 for m in seen), task
    # warm-up of 2 steps to 2e-3, then linear decay
    assert metrics[0]["lr"] == pytest.approx(1e-3) and metrics[1]["lr"] == pytest.approx(2e-3)
    assert metrics[2]["lr"] > metrics[5]["lr"] > metrics[9]["lr"] > 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000010"
    record = json.loads((run_dir / "checkpoints" / "step_000010" / "trainer.json").read_text())
    assert record["step"] == 10 and record["format_version"] == 1 and record["loader_state"]["streams"]
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 2, 2)


def test_reference_run_is_tracked_in_the_run_directory_sqlite_store(reference):
    from mlflow.tracking import MlflowClient

    _, run_dir, metrics = reference
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ofa-scale")
    (run,) = client.search_runs([exp.experiment_id])
    params = run.data.params
    assert params["config.train.global_batch_size"] == "4" and params["config.model.arch"] == "ofa_tiny"
    assert params["deepspeed.zero_optimization.stage"] == "3" and params["layout.dp"] == "1"
    assert len(params["git_commit"]) in (40, 7) or params["git_commit"] == "unknown"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(m["step"], m["loss"]) for m in metrics]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ds_config.json", "layout.json", "data"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "data")] == ["data/manifest.json"]
    # the end-of-run report (ofa_scale/evaluation/report.py): its pictures are in the run dir and in mlflow
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/loss.png", "report/lr.png"} <= report
    assert (run_dir / "report" / "loss.png").stat().st_size > 0


def test_two_processes_zero3_match_one_process(reference, tmp_path, mlflow_server):
    config, _, ref = reference
    run_dir = tmp_path / "dp2"
    # MLFLOW_TRACKING_URI sends this run to a real tracking server instead of the run directory's sqlite file
    # launched by torchrun, as users launch (the other trainer tests fork their ranks from the test zygote)
    run_train(config, run_dir, nproc=2, env={"MLFLOW_TRACKING_URI": mlflow_server}, launcher="torchrun")
    assert not (run_dir / "mlflow.db").exists()
    two = read_metrics(run_dir)
    assert [m["step"] for m in two] == [m["step"] for m in ref]
    for a, b in zip(ref, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert {k for k in a if k.startswith("loss/")} == {k for k in b if k.startswith("loss/")}
        for key in (k for k in a if k.startswith("loss/")):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 1  # 2 ranks x 1 micro-batch = the same global batch of 4
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    record = json.loads((run_dir / "checkpoints" / "step_000010" / "trainer.json").read_text())
    server_run = client.get_run(record["mlflow_run_id"])
    assert server_run.info.status == "FINISHED" and server_run.data.params["layout.dp"] == "2"
    assert [m.value for m in client.get_metric_history(server_run.info.run_id, "loss")] == [m["loss"] for m in two]


def test_resume_continues_with_identical_losses_in_the_same_mlflow_run(reference, tmp_path):
    config, _, ref = reference
    run_dir = tmp_path / "resumed"
    first = run_train(config, run_dir, "--stop-after", "4")
    assert "stopping at step 4" in first.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000004"
    # a second launch without --resume must refuse to overwrite the run
    with pytest.raises(AssertionError, match="already holds a run"):
        run_train(config, run_dir)
    run_train(config, run_dir, "--resume")
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 11))
    for a, b in zip(ref, resumed):
        assert b["loss"] == a["loss"], (a["step"], a["loss"], b["loss"])  # fp32 CPU: bit-identical
        assert b["grad_norm"] == a["grad_norm"]
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        runs = db.execute("select run_uuid, status from runs").fetchall()
        assert len(runs) == 1 and runs[0][1] == "FINISHED"
        steps = [s for (s,) in db.execute("select step from metrics where key='loss' order by step")]
    assert sorted(set(steps)) == list(range(1, 11))


def test_bf16_run_tracks_the_fp32_losses(reference, tmp_path):
    config, _, ref = reference
    run_dir = tmp_path / "bf16"
    # bf16 weights and BatchNorm statistics (the ResNet stem) with fp32 master weights in DeepSpeed's optimizer
    run_train(config, run_dir, "--set", "precision=bf16", "--set", "train.steps=3", "--set", "logging.mlflow=false")
    got = read_metrics(run_dir)
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2) and b["skipped_steps"] == 0


def test_an_unreachable_tracking_server_stops_every_rank_with_one_message(reference, tmp_path):
    from tests.train.conftest import free_port

    config, _, _ = reference
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    # only rank 0 talks to mlflow; rank 1 must not wait forever in the step loop's first collective
    with pytest.raises(AssertionError, match="ofa-train: error: cannot use mlflow at http://127.0.0.1") as err:
        run_train(config, tmp_path / "no_server", nproc=2, env=env, timeout=240)
    assert str(err.value).count("ofa-train: error: cannot use mlflow") == 1  # rank 0's line; rank 1 stays quiet

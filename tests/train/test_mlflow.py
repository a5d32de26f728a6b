"""mlflow logging: the embedded sqlite default and a real tracking server; mlflow's size limits; reopening runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ofa_scale.errors import UserError
from ofa_scale.training.mlflow_logger import (MAX_PARAM_VALUE_CHARS, MlflowRun, param_batches,
                                              resolve_tracking_uri)


def test_param_batches_respect_mlflow_limits():
    params = {f"p{i}": i for i in range(250)}
    params["long"] = "x" * 10_000
    batches = param_batches(params)
    assert [len(b) for b in batches] == [100, 100, 51]
    assert len(batches[-1]["long"]) == MAX_PARAM_VALUE_CHARS and batches[-1]["long"].endswith("[truncated]")


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path, None) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert resolve_tracking_uri(tmp_path, "http://configured:5000") == "http://configured:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(tmp_path, "http://configured:5000") == "http://env:5000"


def _exercise(uri: str, run_dir: Path) -> None:
    run = MlflowRun(uri, "ofa-scale-test", "demo", run_dir)
    run.log_params({f"config.k{i}": i for i in range(150)} | {"git_commit": "abc123"})
    for step in (1, 2, 3):
        run.log_metrics(step, {"loss": 10.0 / step, "loss/caption": 5.0 / step, "grad_norm": None})
    artifact = run_dir / "config.yaml"
    artifact.write_text("model: {arch: ofa_tiny}\n")
    run.log_artifact(artifact)
    run.finish("KILLED")  # e.g. preempted
    # the requeued job reopens the same run by id and keeps logging into it
    again = MlflowRun(uri, "ofa-scale-test", "demo", run_dir, run_id=run.run_id)
    again.log_metrics(4, {"loss": 2.5})
    again.finish()

    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert len(got.data.params) == 151 and got.data.params["config.k149"] == "149"
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 5.0), (3, 10.0 / 3), (4, 2.5)]
    assert [m.step for m in client.get_metric_history(run.run_id, "loss/caption")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["config.yaml"]
    exp = client.get_experiment_by_name("ofa-scale-test")
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_sqlite_store_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(tmp_path, None)
    _exercise(uri, tmp_path)
    assert (tmp_path / "mlflow.db").is_file()
    assert list((tmp_path / "mlartifacts").rglob("config.yaml"))  # artifacts stay next to the database


def test_tracking_server(mlflow_server, tmp_path):
    _exercise(mlflow_server, tmp_path)
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_is_a_user_error(tmp_path, monkeypatch):
    from tests.train.conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(UserError, match="cannot use mlflow at http://127.0.0.1:.*set logging.mlflow=false"):
        MlflowRun(f"http://127.0.0.1:{free_port()}", "x", "y", tmp_path)

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


def test_unreachable_server_fails_fast_without_mlflows_retries(tmp_path):
    from tests.train.conftest import free_port

    # nothing listens: refused at once (mlflow's own retries would take minutes to give up)
    with pytest.raises(UserError, match=r"cannot use mlflow at http://127.0.0.1:\d+: the tracking server did not "
                                        r"answer within 10 s "
                                        r"\(.*\); start it, .* or set logging.mlflow=false"):
        MlflowRun(f"http://127.0.0.1:{free_port()}", "x", "y", tmp_path)


def test_a_server_that_never_answers_times_out_after_connect_timeout_s(tmp_path):
    import socket

    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        with pytest.raises(UserError, match="did not answer within 0.5 s .*raise logging.connect_timeout_s"):
            MlflowRun(f"http://127.0.0.1:{port}", "x", "y", tmp_path, connect_timeout_s=0.5)


def test_sqlite_store_in_an_unwritable_place_is_one_sentence(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"cannot use mlflow at sqlite:///.*a_file/mlflow.db: the sqlite store is "
                                        r"not writable \(.*\); "
                                        r"point logging.tracking_uri at a writable place"):
        MlflowRun(f"sqlite:///{blocker}/mlflow.db", "x", "y", tmp_path)
    # /proc takes no new directories or files, not even from root
    with pytest.raises(UserError, match="the sqlite store is not writable"):
        MlflowRun("sqlite:////proc/ofa-scale-test/mlflow.db", "x", "y", tmp_path)


_KILLED_ATTEMPT = """
import os, sys, time
from pathlib import Path
from ofa_scale.training.mlflow_logger import MlflowRun
run = MlflowRun(sys.argv[1], "ofa-scale-test", "demo", Path(sys.argv[2]))
for step in (1, 2, 3):
    run.log_metrics(step, {"loss": 10.0 / step, "grad_norm": 1.0})
print(run.run_id, flush=True)
time.sleep(600)
"""


def test_a_resume_after_kill_9_logs_each_step_once_and_marks_the_abandoned_attempt(tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(tmp_path, None)
    dead = subprocess.Popen([sys.executable, "-c", _KILLED_ATTEMPT, uri, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        run_id = dead.stdout.readline().strip()
        assert run_id, "the first attempt did not start"
        os.kill(dead.pid, signal.SIGKILL)  # after logging step 3, before any checkpoint past step 1
        dead.wait(timeout=30)
    finally:
        if dead.poll() is None:
            dead.kill()
            dead.wait()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # what kill -9 leaves behind
    # the requeued attempt resumes from the step-1 checkpoint and replays steps 2 and 3
    again = MlflowRun(uri, "ofa-scale-test", "demo", tmp_path, run_id=run_id)
    for step in (2, 3, 4):
        again.log_metrics(step, {"loss": 10.0 / step, "grad_norm": 1.0, "mfu": 0.5})
    got = client.get_run(run_id)
    assert got.info.status == "RUNNING"
    assert got.data.tags["ofa.attempts"] == "2" and got.data.tags["ofa.abandoned_attempts"] == "1@step3"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "grad_norm")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "mfu")] == [2, 3, 4]  # a key the dead one lacked
    again.finish("KILLED")  # a clean stop (preemption) is not an abandoned attempt
    third = MlflowRun(uri, "ofa-scale-test", "demo", tmp_path, run_id=run_id)
    third.finish()
    tags = client.get_run(run_id).data.tags
    assert tags["ofa.attempts"] == "3" and tags["ofa.abandoned_attempts"] == "1@step3"

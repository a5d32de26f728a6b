"""mlflow tracking for one training run (rank 0 only).

Default store: a sqlite file in the run directory (embedded, no server). `MLFLOW_TRACKING_URI`, then
`logging.tracking_uri`, point it elsewhere — on multi-node clusters use a tracking server, since sqlite on a shared
filesystem breaks under file locking. The run id is kept in every checkpoint, so a resumed or requeued job keeps
logging into the same mlflow run.

Uses MlflowClient (not the fluent API) so no global "active run" state leaks into the trainer.

The store is checked up front with a short timeout (`connect_timeout_s`): mlflow's own retries take minutes to
give up on an unreachable server or an unwritable sqlite file. A resumed run skips the steps the previous attempt
already logged (a requeued job replays the steps after its last checkpoint), and an attempt that died without
closing its run (kill -9, node loss: the run is still RUNNING when the next attempt opens it) is recorded in tags.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from ofa_scale.errors import UserError

MAX_PARAMS_PER_CALL = 100  # mlflow's log_batch limit
MAX_PARAM_VALUE_CHARS = 6000  # mlflow's param value limit
MAX_METRICS_PER_CALL = 1000
DEFAULT_CONNECT_TIMEOUT_S = 10.0


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(run_dir: Path, configured: Optional[str]) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or default_tracking_uri(run_dir)


def param_batches(params: dict[str, Any]) -> list[dict[str, str]]:
    """Split params into mlflow-sized calls; values longer than mlflow's limit are cut with a visible marker."""
    items = []
    for key, value in params.items():
        text = "" if value is None else str(value)
        if len(text) > MAX_PARAM_VALUE_CHARS:
            marker = "…[truncated]"
            text = text[: MAX_PARAM_VALUE_CHARS - len(marker)] + marker
        items.append((key, text))
    return [dict(items[i:i + MAX_PARAMS_PER_CALL]) for i in range(0, len(items), MAX_PARAMS_PER_CALL)]


def git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def check_store(tracking_uri: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, in one sentence, when the tracking store cannot work: a server that does not answer within
    `timeout_s`, or a sqlite file whose directory cannot be written. Other stores are left to mlflow."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            return  # it answered: reachable (an auth proxy may refuse /health; mlflow's calls report the rest)
        except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, malformed URLs
            reason = getattr(e, "reason", None) or e
            raise UserError(f"cannot use mlflow at {tracking_uri}: the tracking server did not answer within "
                            f"{timeout_s:g} s ({reason}); start it, fix logging.tracking_uri / MLFLOW_TRACKING_URI, "
                            f"raise logging.connect_timeout_s, or set logging.mlflow=false") from None
    elif tracking_uri.startswith("sqlite:///"):
        _check_writable(Path(tracking_uri[len("sqlite:///"):]), tracking_uri)


def _check_writable(db: Path, tracking_uri: str) -> None:
    # sqlite writes a journal next to the database, so the directory itself must take new files
    folder = db.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mlflow-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        if db.exists():
            with open(db, "r+b"):
                pass
    except OSError as e:
        raise UserError(f"cannot use mlflow at {tracking_uri}: the sqlite store is not writable "
                        f"({e.strerror or e}: {e.filename or folder}); point logging.tracking_uri at a writable "
                        f"place, or set logging.mlflow=false") from None


class MlflowRun:
    """One mlflow run: created fresh, or reopened by id on resume."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_dir: Path,
                 run_id: Optional[str] = None, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S):
        import mlflow

        self.tracking_uri = tracking_uri
        self._mlflow = mlflow
        self.resumed = run_id is not None
        # steps the previous attempts already logged, per metric key: a resume replays steps after its checkpoint
        self._logged_through: dict[str, int] = {}
        check_store(tracking_uri, connect_timeout_s)
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri)
            if run_id is None:
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    # With the embedded store, artifacts live next to the database in the run dir; a server
                    # chooses its own artifact store.
                    location = (str((Path(run_dir) / "mlartifacts").resolve())
                                if tracking_uri.startswith("sqlite:") else None)
                    exp_id = self.client.create_experiment(experiment, artifact_location=location)
                else:
                    exp_id = exp.experiment_id
                run = self.client.create_run(exp_id, run_name=run_name)
                self.run_id = run.info.run_id
            else:
                self.run_id = run_id
                self._reopen(self.client.get_run(run_id))  # get_run fails clearly if the store lost it
        except UserError:
            raise
        except Exception as e:  # connection refused, bad URI, missing run …
            raise UserError(f"cannot use mlflow at {tracking_uri} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "start the tracking server, fix logging.tracking_uri / MLFLOW_TRACKING_URI, "
                            "or set logging.mlflow=false") from None

    def _reopen(self, previous) -> None:
        """Mark the run RUNNING again; remember what the earlier attempts logged; record an abandoned attempt."""
        for key in previous.data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                self._logged_through[key] = max(m.step for m in history)
        tags = previous.data.tags
        attempt = int(tags.get("ofa.attempts", "1")) + 1
        new_tags = {"ofa.attempts": str(attempt)}
        if previous.info.status == "RUNNING":
            # the run directory's lock guarantees no live trainer holds this run, so its last attempt died
            # without closing it
            last = max(self._logged_through.values(), default=0)
            abandoned = [t for t in tags.get("ofa.abandoned_attempts", "").split(",") if t]
            abandoned.append(f"{attempt - 1}@step{last}")  # attempt number @ the last step it logged
            new_tags["ofa.abandoned_attempts"] = ",".join(abandoned)
        self.client.update_run(self.run_id, status="RUNNING")
        self.set_tags(new_tags)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        for batch in param_batches(params):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in batch.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and step > self._logged_through.get(k, -1)]
        for i in range(0, len(items), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS_PER_CALL])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"mlflow run {self.run_id} at {self.tracking_uri}"

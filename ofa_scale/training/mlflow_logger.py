"""mlflow tracking for one training run (rank 0 only).

Default store: a sqlite file in the run directory (embedded, no server). `MLFLOW_TRACKING_URI`, then
`logging.tracking_uri`, point it elsewhere — on multi-node clusters use a tracking server, since sqlite on a shared
filesystem breaks under file locking. The run id is kept in every checkpoint, so a resumed or requeued job keeps
logging into the same mlflow run.

Uses MlflowClient (not the fluent API) so no global "active run" state leaks into the trainer.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from ofa_scale.errors import UserError

MAX_PARAMS_PER_CALL = 100  # mlflow's log_batch limit
MAX_PARAM_VALUE_CHARS = 6000  # mlflow's param value limit
MAX_METRICS_PER_CALL = 1000


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


class MlflowRun:
    """One mlflow run: created fresh, or reopened by id on resume."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_dir: Path,
                 run_id: Optional[str] = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.resumed = run_id is not None
        try:
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
                self.client.get_run(run_id)  # fails clearly if the store lost it
                self.client.update_run(run_id, status="RUNNING")
        except UserError:
            raise
        except Exception as e:  # connection refused, bad URI, missing run …
            raise UserError(f"cannot use mlflow at {tracking_uri} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "start the tracking server, fix logging.tracking_uri / MLFLOW_TRACKING_URI, "
                            "or set logging.mlflow=false") from None

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
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS_PER_CALL])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"mlflow run {self.run_id} at {self.tracking_uri}"

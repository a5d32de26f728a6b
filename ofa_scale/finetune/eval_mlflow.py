"""`ofa-eval run`'s mlflow record for tasks that produce files (image_gen's PNGs and contact sheet, issue 11 §5).

One mlflow run per evaluation, named `eval-<label>` in the recipe's `logging.experiment`, holding the metrics,
where the checkpoint and data came from, and the files as artifacts. The store is the trainer's
(`MLFLOW_TRACKING_URI`, then `logging.tracking_uri`), else a sqlite file in the output directory. It is skipped
when the recipe sets `logging.mlflow: false`. Like the run report, the record is a convenience: a failure is one
warning line and never fails the evaluation whose files are already written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence


def log_evaluation(cfg, out_dir: str | Path, label: str, metrics: dict[str, float], artifacts: Sequence[Path],
                   params: dict[str, Any]) -> str | None:
    """Log to mlflow (module docstring); the run id, or None when skipped or failed."""
    if not cfg.logging.mlflow or not artifacts:
        return None
    try:
        from ofa_scale.training.mlflow_logger import MlflowRun, resolve_tracking_uri

        out = Path(out_dir)
        tracker = MlflowRun(resolve_tracking_uri(out, cfg.logging.tracking_uri), cfg.logging.experiment,
                            f"eval-{label}", out, connect_timeout_s=cfg.logging.connect_timeout_s)
        tracker.log_params({k: str(v) for k, v in params.items()})
        tracker.log_metrics(0, metrics)
        for path in artifacts:
            path = Path(path)
            folder = path.parent.relative_to(out).as_posix() if path.parent != out else None
            tracker.log_artifact(path, folder)
        tracker.finish()
        return tracker.run_id
    except Exception as e:  # noqa: BLE001 — the evaluation's files exist; only their mlflow copy is missing
        print(f"ofa-eval run: warning: images not logged to mlflow ({type(e).__name__}: {e})", file=sys.stderr,
              flush=True)
        return None

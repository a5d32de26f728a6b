"""`ofa-eval report`: PNGs and report.md from a run's metrics.jsonl; one-sentence errors; the trainer's mlflow hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ofa_scale.cli.evaluate import main
from ofa_scale.evaluation.report import log_to_tracker, series, write_report

PRETRAIN_PNGS = {"loss.png", "accuracy.png", "lr.png", "grad_norm.png", "throughput.png", "memory.png"}


def _pretrain_records(steps: int = 12) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": 10.0 / s, "loss/caption": 5.0 / s, "acc/caption": s / steps,
               "lr": 1e-3 * min(1.0, s / 3), "grad_norm": 2.0 / s, "samples_per_s": 8.0, "tokens_per_s": 800.0 + s,
               "skipped_steps": 0, "nonfinite_steps": 0, "data/records": 4 * s,
               "host_peak_gib": 1.0 + s / 100, "host_peak_gib_min": 0.9, "host_rss_gib": 0.95,
               "accel_peak_gib": 3.5}
        if s % 2 == 0:  # an objective absent from odd steps' batches has no key there
            rec.update({"loss/vqa": 4.0 / s, "acc/vqa": 0.5})
        out.append(rec)
    # a non-finite step as the metrics writer stores it: null, and the key listed in `nonfinite`
    out[5].update({"loss": None, "grad_norm": None, "nonfinite": ["loss", "grad_norm"], "nonfinite_steps": 1})
    return out


def _write_run(run_dir: Path, records: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (run_dir / "config.yaml").write_text("model:\n  arch: ofa_tiny\ntrain:\n  steps: 12\n")
    (run_dir / "layout.json").write_text(json.dumps({"world_size": 2, "tp": 1, "pp": 1, "dp": 2, "zero_stage": 3}))
    return run_dir


def _check_pngs(out: Path, names: set[str]) -> None:
    assert {p.name for p in out.glob("*.png")} == names
    for name in names:
        with Image.open(out / name) as im:
            im.verify()  # a truncated or non-PNG file raises here
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 200, name
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_pretraining_run_gets_every_plot_and_a_report_embedding_them(tmp_path, capsys):
    run_dir = _write_run(tmp_path / "run", _pretrain_records())
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / "report"
    assert f"report: {out / 'report.md'} (6 plots)" in capsys.readouterr().out
    _check_pngs(out, PRETRAIN_PNGS)
    report = (out / "report.md").read_text()
    for name in PRETRAIN_PNGS:
        assert f"]({name})" in report, name
    assert "| arch | ofa_tiny |" in report and "| steps | 12 of 12 |" in report
    assert "| layout | world_size 2, dp 2, tp 1, pp 1, ZeRO-3 |" in report
    assert f"| final loss | {10.0 / 12:.4f} (step 12) |" in report
    assert "| non-finite steps skipped | 1 |" in report
    assert "best validation" not in report and "valid_" not in report


def test_nulls_and_absent_keys_are_gaps_not_zeros():
    records = _pretrain_records()
    steps, values = series(records, "grad_norm")
    assert 6 not in steps and len(steps) == 11 and 0.0 not in values
    assert series(records, "loss/vqa")[0] == [2, 4, 6, 8, 10, 12]
    assert series(records, "valid/cider") == ([], [])


def test_finetuning_run_gets_a_validation_plot_per_metric_and_its_best(tmp_path):
    records = _pretrain_records()
    for rec in records:
        rec.pop("accel_peak_gib")  # a CPU run: the memory plot draws host memory only
    records[3].update({"valid/cider": 0.4, "valid/bleu4": 0.1})
    records[7].update({"valid/cider": 0.6, "valid/bleu4": None, "nonfinite": ["valid/bleu4"]})
    records[11].update({"valid/cider": 0.5, "valid/bleu4": 0.2})
    run_dir = _write_run(tmp_path / "ft", records)
    (run_dir / "best.json").write_text(json.dumps({"step": 8, "metric": "cider", "value": 0.6}))
    out = tmp_path / "elsewhere"
    paths = write_report(run_dir, out)
    assert paths[0] == out / "report.md" and not (run_dir / "report").exists()
    names = PRETRAIN_PNGS | {"valid_cider.png", "valid_bleu4.png"}
    _check_pngs(out, names)
    report = (out / "report.md").read_text()
    assert "](valid_cider.png)" in report and "](valid_bleu4.png)" in report
    assert "| best validation | cider 0.6000 (step 8) |" in report


def test_malformed_lines_are_skipped_and_counted(tmp_path, capsys):
    run_dir = _write_run(tmp_path / "run", _pretrain_records(), extra_lines=('{"step": 13, "loss": 0.', "[1, 2]"))
    assert main(["report", str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 malformed lines" in captured.err
    _check_pngs(run_dir / "report", PRETRAIN_PNGS)
    assert "| steps | 12 of 12 |" in (run_dir / "report" / "report.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("no_dir", r"is not a directory; pass the run directory"),
    ("no_metrics", r"metrics.jsonl does not exist; pass the run directory"),
    ("empty", r"metrics.jsonl holds no step records; the run has not finished a step yet."),
    ("only_garbage", r"metrics.jsonl holds no step records"),
])
def test_bad_run_dirs_are_one_sentence(tmp_path, capsys, case, message):
    import re

    run_dir = tmp_path / "run"
    if case != "no_dir":
        run_dir.mkdir()
    if case == "empty":
        (run_dir / "metrics.jsonl").write_text("\n")
    if case == "only_garbage":
        (run_dir / "metrics.jsonl").write_text("not json\n")
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ofa-eval: error: ") and re.search(message, err[-1]), err
    assert "Traceback" not in "\n".join(err)
    assert not (run_dir / "report").exists()


def test_the_trainer_hook_logs_the_report_to_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ofa_scale.training.mlflow_logger import MlflowRun, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = _write_run(tmp_path / "run", _pretrain_records())
    uri = resolve_tracking_uri(run_dir, None)
    tracker = MlflowRun(uri, "ofa-scale-test", "report", run_dir)
    log_to_tracker(tracker, run_dir)
    tracker.finish()
    logged = {Path(a.path).name for a in MlflowClient(tracking_uri=uri).list_artifacts(tracker.run_id, "report")}
    assert logged == PRETRAIN_PNGS | {"report.md"}


def test_a_report_that_cannot_be_drawn_only_warns(tmp_path, capsys):
    class Tracker:
        def log_artifact(self, path, artifact_path=None):
            raise AssertionError("nothing to log")

    log_to_tracker(Tracker(), tmp_path)  # no metrics.jsonl: the run still ends normally
    assert "ofa-train: warning: run report not logged (UserError:" in capsys.readouterr().err

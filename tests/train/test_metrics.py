"""Per-task metrics, the metrics.jsonl log, the console line and the demo summary."""

from __future__ import annotations

import json

import pytest
import torch

from ofa_scale.training.metrics import MetricsFile, TaskAccumulator, console_line, format_duration, read_metrics
from ofa_scale.training.summary import summarise, window_means


def test_task_accumulator_sums_per_task_and_skips_padding_rows():
    acc = TaskAccumulator(["caption", "vqa", "itm"])
    task_ids = torch.tensor([0, 2, -1])
    token_loss = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    correct = torch.tensor([[True, False, True], [True, True, True], [True, True, True]])
    acc.add(task_ids, token_loss, valid, correct, rows=2, input_tokens=17)
    acc.add(torch.tensor([0]), torch.tensor([[3.0, 3.0, 3.0]]), torch.tensor([[True, True, True]]),
            torch.tensor([[True, True, True]]), rows=1, input_tokens=5)
    acc.add_objective(0.25)
    m = acc.task_metrics()
    assert m["loss/caption"] == pytest.approx((1 + 2 + 9) / 5) and m["acc/caption"] == pytest.approx(4 / 5)
    assert m["loss/itm"] == pytest.approx(4.0) and m["acc/itm"] == pytest.approx(1.0)
    assert "loss/vqa" not in m  # absent from the step: no fake zero
    assert (acc.rows, acc.input_tokens, acc.objective) == (3, 22, 0.25)


def test_metrics_file_appends_and_truncates_on_restart(tmp_path):
    f = MetricsFile(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        f.append({"step": step, "loss": 1.0 / step})
    f.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # a line cut by a kill
    f.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    f.append({"step": 4, "loss": 0.3})
    f.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    f.truncate_after(None)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_console_line_is_compact_and_has_an_eta():
    line = console_line({"step": 7, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5, "samples_per_s": 12.0,
                         "tokens_per_s": 3456.0, "skipped_steps": 0}, total_steps=100, eta_s=3725)
    assert line == "step 7/100 | loss 2.5000 | lr 1.00e-04 | gnorm 0.500 | 12.0 samples/s | 3456 tok/s | eta 1:02:05"
    assert format_duration(65) == "1:05" and format_duration(float("nan")) == "?"


def test_summary_compares_first_and_last_windows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(1, 21):
            fh.write(json.dumps({"step": step, "loss": 10.0 - step * 0.4, "loss/caption": 5.0 - 0.2 * step,
                                 "loss/vqa": 1.0, "samples_per_s": 3.0}) + "\n")
    first, last, s0, s1 = window_means(read_metrics(run / "metrics.jsonl"), "loss/caption", 5)
    assert (first, last, s0, s1) == (pytest.approx(4.4), pytest.approx(1.4), 1, 20)
    text, ok = summarise(run, window=5, min_drop=0.1)
    assert not ok  # vqa stayed flat
    assert "loss/caption" in text and "falls" in text and "DOES NOT FALL" in text
    assert "checkpoint: (none yet)" in text

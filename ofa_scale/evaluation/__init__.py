"""Evaluation: task metrics (`metrics/`), result tables, and the scoring/generation behind `ofa-eval`."""

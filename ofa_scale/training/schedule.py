"""fairseq's `polynomial_decay` learning-rate schedule (OFA pretraining, spec §8), as a LambdaLR factor.

Optimizer step s (0-based) runs at lr·f(s): a linear warm-up f = (s+1)/W for s < W, then
lr(s) = end_lr + (lr − end_lr)·(1 − (s − W)/(T − W))^power. The first step already gets a non-zero rate (fairseq
starts at lr/W too) and the last step stays just above end_lr, so no step is spent at a zero rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolynomialDecay:
    """A picklable LambdaLR factor: LambdaLR stores its __dict__ in the scheduler's state_dict."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    end_lr: float = 0.0
    power: float = 1.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        remaining = max(1.0 - (step - self.warmup_steps) / span, 0.0)
        return self.end_lr + (self.peak_lr - self.end_lr) * remaining**self.power

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.peak_lr


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    """An explicit step count wins; otherwise int(ratio × total), as fairseq derives --warmup-ratio."""
    if warmup_steps is not None:
        return warmup_steps
    return int(warmup_ratio * total_steps)


def schedule_from_config(cfg) -> PolynomialDecay:
    """`cfg` is a TrainingConfig; kept duck-typed so the finetuning recipes can reuse it."""
    total = cfg.train.steps
    return PolynomialDecay(total_steps=total,
                           warmup_steps=warmup_steps_for(total, cfg.schedule.warmup_ratio, cfg.schedule.warmup_steps),
                           peak_lr=cfg.optim.lr, end_lr=cfg.schedule.end_lr, power=cfg.schedule.power)


def scheduler_factory(schedule: PolynomialDecay):
    """What deepspeed.initialize takes as `lr_scheduler`: a callable building the scheduler on its optimizer."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    return build


__all__ = ["PolynomialDecay", "schedule_from_config", "scheduler_factory", "warmup_steps_for"]

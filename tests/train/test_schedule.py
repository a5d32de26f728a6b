"""fairseq polynomial_decay as OFA uses it (spec §8): linear warm-up, then decay to end_lr."""

from __future__ import annotations

import pickle

import pytest
import torch

from ofa_scale.training.schedule import PolynomialDecay, scheduler_factory, warmup_steps_for


def test_linear_warmup_then_linear_decay():
    s = PolynomialDecay(total_steps=10, warmup_steps=2, peak_lr=1e-3)
    lrs = [s.lr_at(i) for i in range(10)]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    # after warm-up: 1 - (i-2)/8 of the peak
    assert lrs[2:] == pytest.approx([1e-3 * (1 - (i - 2) / 8) for i in range(2, 10)])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0


def test_end_lr_and_power():
    s = PolynomialDecay(total_steps=101, warmup_steps=1, peak_lr=1.0, end_lr=0.1, power=2.0)
    assert s.lr_at(1) == pytest.approx(1.0)
    assert s.lr_at(51) == pytest.approx(0.1 + 0.9 * 0.5**2)
    assert s.lr_at(101) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)


def test_warmup_ratio_is_truncated_like_fairseq_and_steps_win():
    assert warmup_steps_for(1000, 0.01, None) == 10
    assert warmup_steps_for(150, 0.01, None) == 1
    assert warmup_steps_for(1000, 0.01, 3) == 3
    s = PolynomialDecay(total_steps=5, warmup_steps=0, peak_lr=2.0)
    assert s.lr_at(0) == pytest.approx(2.0)


def test_scheduler_state_round_trips_through_a_checkpoint():
    schedule = PolynomialDecay(total_steps=20, warmup_steps=4, peak_lr=0.5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.5)
    sched = scheduler_factory(schedule)(opt)
    for _ in range(7):
        opt.step()
        sched.step()
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched2 = scheduler_factory(PolynomialDecay(total_steps=20, warmup_steps=4, peak_lr=0.5))(opt2)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched.get_last_lr()[0] == pytest.approx(schedule.lr_at(7))

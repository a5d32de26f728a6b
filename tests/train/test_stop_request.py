"""Clean stops: SIGTERM/SIGUSR1 (Slurm preemption, time limit) or --stop-after end a run at a step boundary, on all
ranks at the same step, so the checkpoint written there can be resumed."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from ofa_scale.training.stop import StopRequest


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_signal_stops_after_the_current_step_and_handlers_are_restored(one_process_group):
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest(stop_after=None)
    assert stop.after_step() is False
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the process keeps running
    assert stop.after_step() is True and stop.reason == "SIGTERM received"
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_after_counts_steps_of_this_invocation(one_process_group):
    stop = StopRequest(stop_after=3)
    assert [stop.after_step() for _ in range(3)] == [False, False, True]
    assert stop.reason == "--stop-after 3"
    stop.restore()

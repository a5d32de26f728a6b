"""Clean stops: SIGTERM/SIGUSR1 (Slurm preemption, time limit, the deepspeed launcher's forwarding) or --stop-after.

The handlers are installed by `ofa-train` before anything slow (imports of DeepSpeed, building the model, the
first batches), so a signal that arrives during start-up is remembered instead of killing the job: the trainer
then stops at its first step boundary, writes a checkpoint and exits 0, and the Slurm supervisor requeues it.
DataLoader workers ignore these signals (ofa_scale/data/loader.py), so a signal sent to the whole process group
reaches the trainer alone.
"""

from __future__ import annotations

import signal
from typing import Optional

SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequest:
    """Stop after the current step on a signal (every rank agrees through one all-reduce) or after `stop_after`
    steps of this invocation."""

    def __init__(self, stop_after: Optional[int] = None):
        self.stop_after = stop_after
        self.steps = 0
        self.signalled: Optional[str] = None
        self.reason = ""
        self._previous: dict = {}
        for name in SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def after_step(self) -> bool:
        """Collective: True on every rank when any rank was signalled, or when --stop-after is reached."""
        from ofa_scale.parallel import collectives

        self.steps += 1
        if collectives.any_rank(self.signalled is not None):
            self.reason = f"{self.signalled or 'signal'} received"
            return True
        if self.stop_after is not None and self.steps >= self.stop_after:
            self.reason = f"--stop-after {self.stop_after}"
            return True
        return False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

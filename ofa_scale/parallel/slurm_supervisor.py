"""Run a training step under Slurm so that preemption ends in a checkpoint and a requeue, not a lost job.

    python -m ofa_scale.parallel.slurm_supervisor [--requeue-on SIGUSR1,SIGTERM] [--no-requeue] -- srun ... ofa-train ...

The sbatch script asks Slurm for a warning signal before the time limit (`#SBATCH --signal=B:USR1@300`, delivered
to the batch shell, i.e. to this process) and, on preemption, Slurm sends SIGTERM. Either way this supervisor:

1. forwards the signal to the launched command (srun forwards it to every training process; ofa-train finishes
   the step in progress, all ranks agree, it writes a checkpoint and exits 0);
2. waits for the command to exit;
3. if a signal arrived and the command exited cleanly, runs `scontrol requeue $SLURM_JOB_ID`, so the job comes back
   and its `--resume` continues from the `latest` checkpoint. A command that failed is not requeued (a crash would
   otherwise loop forever); a run that ended without a signal is done.

The exit status is the command's (or 0 after a requeue was requested, so Slurm does not mark the job failed).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ofa_scale.cli import run_cli
from ofa_scale.errors import UserError

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


@dataclass
class Decision:
    requeue: bool
    exit_code: int
    reason: str


def decide(signals_received: Sequence[str], command_rc: int, requeue_enabled: bool) -> Decision:
    """What to do once the command has exited."""
    if not signals_received:
        return Decision(False, command_rc, "the command ended on its own")
    if command_rc != 0:
        return Decision(False, command_rc, f"the command failed (exit {command_rc}) after "
                                           f"{signals_received[0]}; not requeueing a failing job")
    if not requeue_enabled:
        return Decision(False, 0, f"{signals_received[0]} received; requeue disabled")
    return Decision(True, 0, f"{signals_received[0]} received and the checkpoint was written")


@dataclass
class Supervisor:
    command: list[str]
    signals: tuple[str, ...] = DEFAULT_SIGNALS
    requeue_enabled: bool = True
    scontrol: str = "scontrol"
    log: Callable[[str], None] = lambda msg: print(f"slurm-supervisor: {msg}", file=sys.stderr, flush=True)
    received: list[str] = field(default_factory=list)
    _child: Optional[subprocess.Popen] = None

    def _forward(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        self.log(f"got {name}; forwarding it to the training command")
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signum)

    def run(self) -> int:
        previous = {}
        for name in self.signals:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, self._forward)
        try:
            try:
                self._child = subprocess.Popen(self.command)
            except FileNotFoundError:
                raise UserError(f"cannot run {self.command[0]!r}: not found; check the command after '--'") from None
            rc = self._wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        decision = decide(self.received, rc, self.requeue_enabled)
        self.log(decision.reason)
        if decision.requeue:
            return self.requeue(decision.exit_code)
        return decision.exit_code

    def _wait(self) -> int:
        while True:
            try:
                return self._child.wait()
            except InterruptedError:  # a signal handler ran; keep waiting for the command to finish
                continue

    def requeue(self, exit_code: int) -> int:
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            self.log("no SLURM_JOB_ID in the environment; nothing to requeue (resume by hand with --resume)")
            return exit_code
        result = subprocess.run([self.scontrol, "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            self.log(f"scontrol requeue {job} failed: {result.stderr.strip() or result.stdout.strip()} "
                     f"(is the job submitted with --requeue?)")
            return result.returncode
        self.log(f"requeued job {job}; it resumes from the latest checkpoint")
        return exit_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ofa-slurm-supervisor", description=__doc__.splitlines()[0])
    p.add_argument("--requeue-on", default=",".join(DEFAULT_SIGNALS),
                   help="comma-separated signals that mean 'checkpoint and requeue' (default SIGUSR1,SIGTERM)")
    p.add_argument("--no-requeue", action="store_true", help="forward signals but never requeue")
    p.add_argument("--scontrol", default="scontrol", help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- followed by the launch command")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def go() -> int:
        command = list(args.command)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            raise UserError("no command given; put the launch command after '--'")
        names = tuple(s.strip().upper() for s in args.requeue_on.split(",") if s.strip())
        for name in names:
            if not name.startswith("SIG") or not hasattr(signal, name):
                raise UserError(f"--requeue-on: {name!r} is not a signal name; use e.g. SIGUSR1,SIGTERM")
        return Supervisor(command, names, not args.no_requeue, args.scontrol).run()

    return run_cli(go, "ofa-slurm-supervisor")


if __name__ == "__main__":
    sys.exit(main())

"""Run a training step under Slurm so that preemption ends in a checkpoint and a requeue, not a lost job.

    python -m ofa_scale.parallel.slurm_supervisor --run-dir RUN_DIR [--requeue-on SIGUSR1,SIGTERM]
        [--forward-as SIGUSR1] [--no-requeue] -- srun ... ofa-train ...

The sbatch script asks Slurm for a warning signal before the time limit (`#SBATCH --signal=B:USR1@600`, delivered
to the batch shell, i.e. to this process); `scancel --signal=USR1 --batch JOB` delivers the same by hand, and a
preemption (or `scontrol requeue JOB`) sends SIGTERM to every process of the job. Either way this supervisor:

1. forwards SIGUSR1 to the launched command, whatever it received: srun passes SIGUSR1 on to every task, but
   turns a SIGTERM it receives into SIGKILL for the tasks ("srun: forcing job termination"), which would kill
   the ranks before they checkpoint. ofa-train treats SIGUSR1 and SIGTERM alike: it finishes the step in
   progress, all ranks agree, it writes a checkpoint and exits 0;
2. waits for the command to exit;
3. requeues the job (`scontrol requeue $SLURM_JOB_ID`) only when a signal arrived, the command exited 0 and
   RUN_DIR/status.json (written by ofa-train at the end of every invocation) says "stopped". A command that
   failed is not requeued (a crash would otherwise loop forever), and neither is a run that reached train.steps
   (a signal during the last step would otherwise requeue a finished run). When Slurm has already requeued the
   job itself (preemption, `scontrol requeue`), that is the requeue: it is reported, not repeated; if the run
   finished nonetheless, the requeued job is cancelled.

On a preemption the ranks have from SIGTERM to SIGKILL to write their checkpoint: the partition's GraceTime (0 by
default) plus slurm.conf KillWait (30 s by default). The `--signal=...@600` lead time applies to the time limit
only.

The exit status is the command's (or 0 after a requeue, so Slurm does not mark the job failed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ofa_scale.cli import run_cli
from ofa_scale.errors import UserError

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")
# srun forwards SIGUSR1 to its tasks unchanged; SIGTERM, SIGHUP and SIGQUIT make it SIGKILL them
DEFAULT_FORWARD = "SIGUSR1"


@dataclass
class Decision:
    requeue: bool
    exit_code: int
    reason: str


def decide(signals_received: Sequence[str], command_rc: int, requeue_enabled: bool,
           run_state: Optional[str] = None) -> Decision:
    """What to do once the command has exited. `run_state` is the state in RUN_DIR/status.json that this
    invocation wrote ("stopped" or "finished"), "missing" when it wrote none, None when no run dir is watched."""
    if not signals_received:
        return Decision(False, command_rc, "the command ended on its own")
    if command_rc != 0:
        return Decision(False, command_rc, f"the command failed (exit {command_rc}) after "
                                           f"{signals_received[0]}; not requeueing a failing job")
    if run_state == "finished":
        return Decision(False, 0, f"{signals_received[0]} received, but the run reached its last step; "
                                  f"not requeueing a finished run")
    if run_state is not None and run_state != "stopped":
        return Decision(False, 0, f"{signals_received[0]} received, but the command left no 'stopped' status in "
                                  f"the run dir ({run_state}); not requeueing")
    if not requeue_enabled:
        return Decision(False, 0, f"{signals_received[0]} received; requeue disabled")
    return Decision(True, 0, f"{signals_received[0]} received and the checkpoint was written")


class RunStatus:
    """RUN_DIR/status.json as this invocation left it: a file already there before the command started and not
    rewritten since is stale (the command ended without writing one), which a snapshot taken at start tells."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "status.json"
        self.before = self._snapshot()

    def _snapshot(self):
        try:
            st = self.path.stat()
            return st.st_mtime_ns, st.st_ino, self.path.read_bytes()
        except OSError:
            return None

    def state(self) -> str:
        now = self._snapshot()
        if now is None:
            return f"missing {self.path}"
        if now == self.before:
            return f"{self.path} was not rewritten"
        try:
            return str(json.loads(now[2]).get("state"))
        except (ValueError, AttributeError):
            return f"unreadable {self.path}"


@dataclass
class Supervisor:
    command: list[str]
    signals: tuple[str, ...] = DEFAULT_SIGNALS
    requeue_enabled: bool = True
    scontrol: str = "scontrol"
    scancel: str = "scancel"
    forward_as: Optional[str] = DEFAULT_FORWARD   # None: forward the signal received
    run_dir: Optional[Path] = None
    log: Callable[[str], None] = lambda msg: print(f"slurm-supervisor: {msg}", file=sys.stderr, flush=True)
    received: list[str] = field(default_factory=list)
    _child: Optional[subprocess.Popen] = None

    def _forward(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        out = self.forward_as or name
        self.log(f"got {name}; forwarding {out} to the training command")
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(getattr(signal, out))

    def run(self) -> int:
        status = RunStatus(self.run_dir) if self.run_dir is not None else None
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
        state = status.state() if status else None
        decision = decide(self.received, rc, self.requeue_enabled, state)
        self.log(decision.reason)
        if decision.requeue:
            return self.requeue(decision.exit_code)
        if self.received and state == "finished":
            self._cancel_slurms_requeue()
        return decision.exit_code

    def _wait(self) -> int:
        while True:
            try:
                return self._child.wait()
            except InterruptedError:  # a signal handler ran; keep waiting for the command to finish
                continue

    def _restarts(self, job: str) -> Optional[int]:
        """Slurm's restart count of the job now (None when scontrol cannot tell)."""
        result = subprocess.run([self.scontrol, "show", "job", "-o", job], capture_output=True, text=True)
        if result.returncode != 0:
            return None
        for item in result.stdout.split():
            if item.startswith("Restarts="):
                try:
                    return int(item.split("=", 1)[1])
                except ValueError:
                    return None
        return None

    def _already_requeued(self, job: str) -> bool:
        """Slurm requeues a preempted job (and one given `scontrol requeue`) itself, raising its restart count
        above the one this invocation started with."""
        now = self._restarts(job)
        return now is not None and now > int(os.environ.get("SLURM_RESTART_COUNT") or 0)

    def _cancel_slurms_requeue(self) -> None:
        """A preemption that came during the last step: the run finished, but Slurm has requeued the job anyway,
        and the copy would only fail ("already reached step"). Cancel it (the job then ends CANCELLED)."""
        job = os.environ.get("SLURM_JOB_ID")
        if job and self._already_requeued(job):
            result = subprocess.run([self.scancel, job], capture_output=True, text=True)
            if result.returncode == 0:
                self.log(f"the run is finished but Slurm had requeued job {job}; cancelled the requeued job")
            else:
                self.log(f"the run is finished but Slurm had requeued job {job}, and scancel {job} failed: "
                         f"{result.stderr.strip() or result.stdout.strip()}; cancel it by hand")

    def requeue(self, exit_code: int) -> int:
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            self.log("no SLURM_JOB_ID in the environment; nothing to requeue (resume by hand with --resume)")
            return exit_code
        if self._already_requeued(job):
            self.log(f"Slurm already requeued job {job} (preemption or scontrol requeue); it resumes from the "
                     f"latest checkpoint")
            return exit_code
        result = subprocess.run([self.scontrol, "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            if self._already_requeued(job):  # requeued by Slurm between the check and our request
                self.log(f"Slurm already requeued job {job}; it resumes from the latest checkpoint")
                return exit_code
            answer = result.stderr.strip() or result.stdout.strip()
            hint = " (submit the job with --requeue)" if "disabled" in answer else ""
            self.log(f"scontrol requeue {job} failed: {answer}{hint}")
            return result.returncode
        self.log(f"requeued job {job}; it resumes from the latest checkpoint")
        return exit_code


def _signal_name(option: str, name: str) -> str:
    name = name.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if not hasattr(signal, name):
        raise UserError(f"{option}: {name!r} is not a signal name; use e.g. SIGUSR1")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ofa-slurm-supervisor", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default=None,
                   help="the training run dir: requeue only when its status.json says the run stopped early "
                        "(without it, any clean exit after a signal is requeued)")
    p.add_argument("--requeue-on", default=",".join(DEFAULT_SIGNALS),
                   help="comma-separated signals that mean 'checkpoint and requeue' (default SIGUSR1,SIGTERM)")
    p.add_argument("--forward-as", default=DEFAULT_FORWARD,
                   help="the signal sent to the command whatever was received (default SIGUSR1, which srun "
                        "passes to its tasks; srun turns SIGTERM into SIGKILL); 'same' forwards the one received")
    p.add_argument("--no-requeue", action="store_true", help="forward signals but never requeue")
    p.add_argument("--scontrol", default="scontrol", help=argparse.SUPPRESS)
    p.add_argument("--scancel", default="scancel", help=argparse.SUPPRESS)
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
        names = tuple(_signal_name("--requeue-on", s) for s in args.requeue_on.split(",") if s.strip())
        forward = None if args.forward_as.strip().lower() == "same" else _signal_name("--forward-as", args.forward_as)
        run_dir = Path(args.run_dir) if args.run_dir else None
        return Supervisor(command, names, not args.no_requeue, args.scontrol, args.scancel, forward, run_dir).run()

    return run_cli(go, "ofa-slurm-supervisor")


if __name__ == "__main__":
    sys.exit(main())

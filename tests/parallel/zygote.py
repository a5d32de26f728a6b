"""Start rank processes by forking a pre-warmed server (zygote_server.py) instead of a fresh interpreter each.

`start(argv, env, log)` returns a handle with the `subprocess.Popen` methods the launchers use (wait(timeout), kill,
pid). The server is started once per test session, with the environment every rank process shares
(OMP_NUM_THREADS=1, DS_ACCELERATOR=cpu), because modules read some variables at import time; the per-rank variables
(RANK, MASTER_PORT, ...) are only read at run time and are set in each child.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVER = Path(__file__).with_name("zygote_server.py")
# variables the server's imports may have read: a request must agree with them (else it runs as a fresh process)
IMPORT_TIME_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}


class _Server:
    def __init__(self):
        env = dict(os.environ, **IMPORT_TIME_ENV)
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        first = self.proc.stdout.readline()
        if not first or not json.loads(first).get("ready"):
            raise RuntimeError("the test zygote server did not start (run tests/parallel/zygote_server.py by hand)")
        self.lock = threading.Lock()  # one request in flight: its {"pid"} reply is the next spawn reply
        self.cond = threading.Condition()
        self.spawned: list[int] = []
        self.exits: dict[int, int] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "pid" in msg:
                    self.spawned.append(msg["pid"])
                else:
                    self.exits[msg["exited"]] = msg["rc"]
                self.cond.notify_all()
        with self.cond:  # server gone: nothing will be reported any more
            self.proc.poll()
            self.cond.notify_all()

    def spawn(self, request: dict) -> int:
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            with self.cond:
                if not self.cond.wait_for(lambda: self.spawned or self.proc.poll() is not None, timeout=60):
                    raise RuntimeError("the test zygote server did not answer")
                if not self.spawned:
                    raise RuntimeError("the test zygote server died")
                return self.spawned.pop(0)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self.cond:
            self.cond.wait_for(lambda: pid in self.exits or self.proc.poll() is not None, timeout=timeout)
            return self.exits.get(pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_server: _Server | None = None


def _get_server() -> _Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
        atexit.register(_server.close)
    return _server


class ZygoteProcess:
    """A forked rank process; the subset of Popen that parallel_launch uses."""

    def __init__(self, argv: list[str], env: dict, log: Path, cwd: Path | None = None):
        self._server = _get_server()
        self.pid = self._server.spawn({"argv": [str(a) for a in argv], "env": env, "log": str(log),
                                       "cwd": str(cwd or os.getcwd())})
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        rc = self._server.wait(self.pid, timeout)
        if rc is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"zygote child {self.pid}", timeout)
            raise RuntimeError("the test zygote server died while a rank was running")
        self.returncode = rc
        return rc

    def poll(self) -> int | None:
        rc = self._server.wait(self.pid, 0)
        if rc is not None:
            self.returncode = rc
        return rc

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def usable(env: dict) -> bool:
    """Whether a process with `env` can be forked from the server (its import-time variables agree)."""
    return all(env.get(k) == v for k, v in IMPORT_TIME_ENV.items()) and os.environ.get("OFA_TEST_NO_ZYGOTE") != "1"


def run(argv: list[str], env: dict, log: Path, *, world: int = 1, cwd: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python *argv` on `world` forked ranks (RANK, WORLD_SIZE, MASTER_* set as torchrun sets them) and wait.

    Returns a CompletedProcess whose stdout is every rank's log (stderr included) and whose returncode is the first
    nonzero rank status (or "timeout" after killing them all)."""
    from parallel_launch import _free_port

    port = _free_port()
    logs = [Path(f"{log}.rank{r}") if world > 1 else Path(log) for r in range(world)]
    procs = []
    for rank in range(world):
        rank_env = dict(env)
        if world > 1:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(ZygoteProcess(argv, rank_env, logs[rank], cwd=cwd))
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append("timeout")
            break
    output = "".join(f.read_text(errors="replace") if f.exists() else "" for f in logs)
    rc = next((c for c in codes if c != 0), 0)
    return subprocess.CompletedProcess(["python", *argv], rc, stdout=output, stderr="")

"""DataLoader workers survive stop signals sent to the whole process group, and die with a killed parent."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shard_factory import write_dataset

CHILD = Path(__file__).with_name("loader_worker_child.py")
REPO = Path(__file__).resolve().parents[2]


def _start(root, mode):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A session of its own: signalling its process group reaches it and its workers, as Slurm's signals do.
    return subprocess.Popen([sys.executable, str(CHILD), str(root), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in "ZX"  # an unreaped zombie holds no memory


def _workers(parent: int, count: int, timeout: float = 60) -> list[int]:
    """The forked DataLoader workers of `parent` (children running the same command line)."""
    deadline = time.monotonic() + timeout
    found: list[int] = []
    while time.monotonic() < deadline:
        found = []
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()  # empty until its exec has completed
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (_stat(int(entry.name)) or ("", 0))[1] == parent:
                try:
                    if cmdline and (entry / "cmdline").read_bytes() == cmdline:
                        found.append(int(entry.name))
                except OSError:
                    continue
        if len(found) == count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"process {parent} did not start {count} workers: children {found}, "
                         f"state {_stat(parent)}")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    write_dataset(root, {"vl": [8, 8]})
    return root


@pytest.mark.slow
def test_workers_survive_stop_signals_sent_to_the_process_group(root):
    child = _start(root, "signals")
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        workers = _workers(child.pid, 2)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.killpg(child.pid, sig)  # what `kill -TERM -<pgid>`, Slurm or the deepspeed launcher do
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err[-3000:]
    assert "received 3 signals, batches as expected" in out
    assert "killed by signal" not in err
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)  # and the loader still ends them when it is done


@pytest.mark.slow
def test_busy_workers_die_with_a_killed_parent(root):
    child = _start(root, "busy")
    workers = []
    try:
        workers = _workers(child.pid, 2)
        time.sleep(1)  # let them reach the worker set-up and the slow record_fn
        child.kill()  # kill -9: the trainer cannot end its workers itself
        child.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "orphaned DataLoader workers stayed alive"
    finally:
        if child.poll() is None:
            child.kill()
        for w in workers:  # the pids this test started, should they have survived
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        child.communicate()


def test_a_process_exits_while_an_iteration_with_workers_is_still_referenced(root):
    # Workers ignore SIGTERM, which multiprocessing's exit handler uses before joining them: without the loader's
    # own exit hook this child never exits.
    child = _start(root, "exit-live")
    try:
        ready = child.stdout.readline().split()
        assert ready[:1] == ["ready"], child.stderr.read()
        workers = [int(pid) for pid in ready[1:]]
        assert len(workers) == 2
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err[-3000:]
    assert not any(_alive(w) for w in workers)

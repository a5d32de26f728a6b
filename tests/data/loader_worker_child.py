"""A trainer stand-in for tests/data/test_loader_workers.py: a loader with 2 DataLoader workers.

    python loader_worker_child.py ROOT signals   # handles the stop signals like the trainer, keeps iterating
    python loader_worker_child.py ROOT busy      # workers stuck in a slow record_fn (for kill -9 of this process)
    python loader_worker_child.py ROOT exit-live # returns while an iteration (and its workers) is still referenced
"""

import multiprocessing
import signal
import sys
import time

from ofa_scale.data.loader import ShardLoader
from ofa_scale.data.loader_config import LoaderConfig

STOP = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def slow_record(record):
    time.sleep(300)  # a worker busy far longer than the test waits for it to go
    return [record]


def keys(loader, batches):
    it = iter(loader)
    return [next(it)[0]["key"] for _ in range(batches)]


def main(root: str, mode: str) -> None:
    received = []
    for sig in STOP:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    cfg = LoaderConfig(root=root, composition={"vl": 1}, num_streams=2, shuffle_buffer=0, num_workers=2,
                       prefetch_factor=1)
    if mode == "exit-live":
        global LIVE  # still referenced at interpreter exit, as a trainer's `iter(loader)` is
        LIVE = iter(ShardLoader(cfg))
        next(LIVE), next(LIVE)
        print("ready", *(p.pid for p in multiprocessing.active_children()), flush=True)
        return
    if mode == "busy":
        next(iter(ShardLoader(cfg, record_fn=slow_record)))
        return
    expected = keys(ShardLoader(LoaderConfig(**{**cfg.__dict__, "num_workers": 0})), 12)
    loader = ShardLoader(cfg)
    it = iter(loader)
    got = [next(it)[0]["key"] for _ in range(2)]  # one from each worker: both have started
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while len(received) < len(STOP) and time.monotonic() < deadline:
        time.sleep(0.05)
    got += [next(it)[0]["key"] for _ in range(10)]  # far more than was prefetched before the signals
    del it
    print(f"received {len(received)} signals, batches {'as expected' if got == expected else 'differ'}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The streaming, resumable, world-size-invariant loader of micro-batches.

Global step t is the t-th chunk of every canonical stream (ofa_scale/data/streams.py). Data-parallel rank r of W
owns streams j with j % W == r and yields, per global step, one micro-batch per owned stream in stream order:
C/W micro-batches per step, which is the gradient-accumulation count. The union of all ranks' micro-batches of
step t is therefore the same for every W dividing C.

Inside a rank, the owned streams are spread over torch DataLoader workers so that the DataLoader's round-robin
collection returns micro-batches in exactly the order a single process would produce them. Decoding, the
consumer's `record_fn(record) -> list[example]` and `collate_fn(examples) -> batch` run in the workers.

Every micro-batch travels with its stream's position after it; the loader records the position only when it hands
the batch to the consumer, so `state_dict()` describes what was consumed, not what workers prefetched. Restoring
the state fast-forwards each stream without decoding what was skipped.

Finite mode (`mode="epochs"`): an epoch has `steps_per_epoch = min over sources of (N_s // C) // count_s` global
steps; every rank yields the same number of micro-batches. The records a stream's slice still holds after the
epoch's last step (for the source that limits the epoch, at most about one global batch's worth; other sources
also drop what exceeds the composition's ratio) are dropped and counted in
`stats()["data/<source>/dropped_epoch_remainder"]`; the next epoch reads a freshly shuffled pass.

Damaged data (`on_corrupt="skip"`) is counted per stream and the counts ride in the stream positions, so
`stats()` is exact for what was consumed, also with workers, and survives a resume; summed over ranks it is the
same on every world size. DataLoader workers ignore the job's stop signals (the trainer alone handles them) and
die with the process that started them (ofa_scale/data/loader_workers.py).
"""

from __future__ import annotations

import atexit
import copy
import functools
import logging
import weakref
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ofa_scale.data.loader_config import LoaderConfig
from ofa_scale.data.loader_workers import init_worker, stop_signals_blocked, worker_parent_pid
from ofa_scale.data.stream_catalog import SourceCatalog, load_catalog
from ofa_scale.data.streams import CanonicalStream, StreamSettings, add_stats, flat_stats, new_stats
from ofa_scale.errors import UserError

log = logging.getLogger(__name__)

LOADER_STATE_VERSION = 1

RecordFn = Callable[[dict], list]
CollateFn = Callable[[list], Any]


def _keep(item):
    """DataLoader "collate" for already-built batches (the default would try to convert them)."""
    return item


class _WorkerFailure:
    """A user-caused error inside a worker (damaged shard with on_corrupt=fail, no readable sample, ...)."""

    def __init__(self, message: str):
        self.message = message


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


class _RankStreams(IterableDataset):
    """The micro-batches of one rank from a given start, split over DataLoader workers."""

    def __init__(self, catalogs: dict[str, SourceCatalog], settings: StreamSettings, streams: list[int],
                 states: list[dict], first: int, end_step: int | None, record_fn: RecordFn | None,
                 collate_fn: CollateFn | None):
        self.catalogs = catalogs
        self.settings = settings
        self.streams = streams
        self.states = states
        self.first = first  # index of the first micro-batch to produce in the rank's sequence t * k + i
        self.end_step = end_step
        self.record_fn = record_fn
        self.collate_fn = collate_fn

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = len(self.streams)
        # The DataLoader asks workers round-robin, starting at worker 0: worker w gets micro-batches
        # first + w, first + w + n, ... which (n dividing k) always belong to the same streams.
        mine = {}
        for i in range(k):
            if (i - self.first) % num_workers == worker:
                stream = CanonicalStream(self.streams[i], self.catalogs, self.settings)
                stream.restore(self.states[i])
                mine[i] = stream
        m = self.first + worker
        try:
            yield from self._produce(mine, m, num_workers)
        except UserError as exc:
            # Hand the one-line message to the main process; the DataLoader would wrap it in a worker traceback.
            yield _WorkerFailure(str(exc))

    def _produce(self, mine: dict[int, CanonicalStream], m: int, num_workers: int) -> Iterator[tuple]:
        k = len(self.streams)
        while True:
            step, i = divmod(m, k)
            if self.end_step is not None and step >= self.end_step:
                return
            stream = mine[i]
            records = stream.next_chunk()
            if self.record_fn is not None:
                examples = [ex for record in records for ex in self.record_fn(record)]
            else:
                examples = records
            batch = self.collate_fn(examples) if self.collate_fn is not None else examples
            yield batch, stream.index, stream.state()
            m += num_workers


class ShardLoader:
    """Micro-batches for data-parallel rank `rank` of `world_size`; iterate it, save `state_dict()`.

    rank/world_size come from the caller (never from environment variables). Iterating again continues from the
    last consumed micro-batch.
    """

    def __init__(self, cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1,
                 record_fn: RecordFn | None = None, collate_fn: CollateFn | None = None):
        cfg.validate()
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"data-parallel rank {rank} of world size {world_size} is invalid; "
                            f"need 0 <= rank < world_size")
        if cfg.num_streams % world_size:
            raise UserError(f"the {cfg.num_streams} canonical streams (train.global_batch_size / "
                            f"train.micro_batch_size) are not divisible by the data-parallel world size "
                            f"{world_size}; use a world size dividing it")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.record_fn, self.collate_fn = record_fn, collate_fn
        self.catalogs = load_catalog(cfg.root, list(cfg.composition))
        composition = tuple(cfg.composition.items())
        if cfg.verify_shards:
            unlisted = [s.path for c in self.catalogs.values() for s in c.shards if not s.sha256]
            if unlisted:
                raise UserError(f"data.verify_shards is on but no sha256 is listed for shard {unlisted[0]} "
                                f"(and {len(unlisted) - 1} more); convert with `ofa-preprocess shards`, whose "
                                f"manifest.json lists them, or turn data.verify_shards off")
        for source, cat in self.catalogs.items():
            if cat.num_samples < cfg.num_streams:
                raise UserError(f"source '{source}' has {cat.num_samples} samples, fewer than the "
                                f"{cfg.num_streams} canonical streams (global batch / micro batch); every stream "
                                f"needs at least one: lower the global batch or add data")
        steps_per_epoch = None
        if cfg.mode == "epochs":
            per_source = {s: (self.catalogs[s].num_samples // cfg.num_streams) // n for s, n in composition}
            steps_per_epoch = min(per_source.values())
            if steps_per_epoch == 0:
                short = min(per_source, key=per_source.get)
                raise UserError(f"source '{short}' has {self.catalogs[short].num_samples} samples, fewer than one "
                                f"global batch needs ({cfg.num_streams} streams x {cfg.composition[short]}); "
                                f"lower num_streams or the composition")
        self.settings = StreamSettings(
            seed=cfg.seed, num_streams=cfg.num_streams, composition=composition,
            shuffle_buffer=cfg.shuffle_buffer, decode_min_size=tuple(cfg.decode_min_size.items()),
            on_corrupt=cfg.on_corrupt, steps_per_epoch=steps_per_epoch, verify_shards=cfg.verify_shards)
        self.streams = list(range(rank, cfg.num_streams, world_size))
        self.num_workers = _largest_divisor_at_most(len(self.streams), cfg.num_workers) if cfg.num_workers else 0
        if cfg.num_workers and self.num_workers != cfg.num_workers:
            log.warning("using %d DataLoader workers instead of %d: the worker count must divide the %d streams "
                        "of this rank to keep the order deterministic", self.num_workers, cfg.num_workers,
                        len(self.streams))
        self._states = {j: {"step": 0, "sources": {s: [0, 0, 0, 0] for s, _ in composition}}
                        for j in self.streams}

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def streams_per_rank(self) -> int:
        """Micro-batches per global step on this rank (= gradient accumulation steps)."""
        return len(self.streams)

    @property
    def steps_per_epoch(self) -> int | None:
        return self.settings.steps_per_epoch

    @property
    def total_steps(self) -> int | None:
        """Global steps of the whole run in finite mode; None when resampled (infinite)."""
        spe = self.settings.steps_per_epoch
        return None if spe is None else spe * self.cfg.epochs

    @property
    def step(self) -> int:
        """Global steps fully consumed by this rank."""
        return min(s["step"] for s in self._states.values())

    @property
    def epoch(self) -> int:
        """Finite mode: the epoch the next global step belongs to (0-based); resampled mode: always 0."""
        spe = self.settings.steps_per_epoch
        return 0 if spe is None else self.step // spe

    # ---- iteration ---------------------------------------------------------------------------------------
    def _first_micro_batch(self) -> int:
        k = len(self.streams)
        first = min(self._states[j]["step"] * k + i for i, j in enumerate(self.streams))
        for i, j in enumerate(self.streams):
            expected = -(-(first - i) // k)  # the first step of stream i at or after micro-batch `first`
            if self._states[j]["step"] != expected:
                raise UserError("the loader state was saved in the middle of a global step in a way this rank "
                                "cannot continue; save loader states at optimizer-step boundaries")
        return first

    def __iter__(self) -> Iterator[Any]:
        batches = self._batches()
        if self.num_workers > 0:
            _close_at_exit(batches)
        return batches

    def _batches(self) -> Iterator[Any]:
        dataset = _RankStreams(self.catalogs, self.settings, self.streams,
                               [self._states[j] for j in self.streams], self._first_micro_batch(),
                               self.total_steps, self.record_fn, self.collate_fn)
        if self.num_workers == 0:
            source = iter(dataset)
        else:
            # Workers are forked here: the stop signals stay blocked until each worker ignores them.
            with stop_signals_blocked():
                source = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                         prefetch_factor=self.cfg.prefetch_factor, collate_fn=_keep,
                                         pin_memory=self.cfg.pin_memory, persistent_workers=False,
                                         worker_init_fn=functools.partial(init_worker, worker_parent_pid())))
        try:
            for item in source:
                if isinstance(item, _WorkerFailure):
                    raise UserError(item.message)
                batch, stream, state = item
                # Record the position (and the stream's counts) only now that the consumer receives the batch:
                # prefetched batches still in flight are not part of the saved state.
                self._states[stream] = state
                yield batch
        finally:
            del source

    def iter_steps(self) -> Iterator[list[Any]]:
        """Group the micro-batches by global step: lists of `streams_per_rank` batches (one optimizer step).

        Assumes the loader is at a step boundary (as it is after loading a state saved at one)."""
        k = len(self.streams)
        group: list[Any] = []
        for batch in self:
            group.append(batch)
            if len(group) == k:
                yield group
                group = []

    # ---- state and stats ---------------------------------------------------------------------------------
    def _header(self) -> dict:
        return {
            "format_version": LOADER_STATE_VERSION,
            "num_streams": self.cfg.num_streams,
            "seed": self.cfg.seed,
            "mode": self.cfg.mode,
            "shuffle_buffer": self.cfg.shuffle_buffer,  # positions count shuffle-buffer outputs
            "composition": [[s, n] for s, n in self.settings.composition],
            "data": {s: c.signature() for s, c in self.catalogs.items()},
        }

    def state_dict(self) -> dict:
        """JSON-serialisable positions of this rank's streams after the last micro-batch it handed out."""
        return {**self._header(), "streams": {str(j): copy.deepcopy(self._states[j]) for j in self.streams}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state (this rank's or merged from all ranks, for another world size)."""
        header = self._header()
        for key, value in header.items():
            if state.get(key) != value:
                raise UserError(f"the loader state's {key} ({state.get(key)!r}) differs from this run's "
                                f"({value!r}); resume with the same loader settings and shards")
        missing = [j for j in self.streams if str(j) not in state.get("streams", {})]
        if missing:
            raise UserError(f"the loader state lacks streams {missing} of rank {self.rank}; save the merged "
                            f"state of all ranks (merge_loader_states) to resume with another world size")
        for j in self.streams:
            self._states[j] = copy.deepcopy(state["streams"][str(j)])
        self._first_micro_batch()  # refuse an inconsistent state now, not at the first batch

    def stats(self) -> dict[str, int]:
        """Counters of the micro-batches this rank consumed, flat and cheap enough to log every step.

        `data/<key>` totals and `data/<source>/<key>` for every key of streams.STAT_KEYS: records,
        skipped_samples (undecodable), corrupt_shards, truncated_shards, missing_samples (what damaged shards
        did not deliver), refilled, dropped_epoch_remainder. Shard counts are per pass read. Cumulative over
        the run, resumes included; sum them over data-parallel ranks for the run's totals."""
        per_source = new_stats(s for s, _ in self.settings.composition)
        for j in self.streams:
            add_stats(per_source, self._states[j].get("stats", {}))
        return flat_stats(per_source)


def merge_loader_states(states: list[dict]) -> dict:
    """One state holding every rank's streams (gather each rank's `state_dict()` first)."""
    if not states:
        raise UserError("no loader states to merge")
    header = {k: v for k, v in states[0].items() if k != "streams"}
    streams: dict = {}
    for state in states:
        if {k: v for k, v in state.items() if k != "streams"} != header:
            raise UserError("the loader states to merge come from runs with different loader settings")
        streams.update(copy.deepcopy(state["streams"]))
    return {**header, "streams": streams}


# Iterations whose DataLoader workers may still be alive. Workers ignore SIGTERM (data/loader_workers.py), and at
# interpreter exit multiprocessing's own handler terminates and then joins its daemonic children, so a worker of an
# iteration still referenced then (a trainer's `iter(loader)`) would be joined forever. Closing the iteration first
# ends its workers the normal way (the DataLoader iterator shuts them down when it is released).
_LIVE_ITERATIONS: "weakref.WeakSet" = weakref.WeakSet()
_EXIT_HOOK: list[bool] = []


def _close_at_exit(batches: Iterator[Any]) -> None:
    _LIVE_ITERATIONS.add(batches)
    if not _EXIT_HOOK:
        # registered after multiprocessing's (workers exist only once it is imported): atexit runs it first
        atexit.register(_close_live_iterations)
        _EXIT_HOOK.append(True)


def _close_live_iterations() -> None:
    for batches in list(_LIVE_ITERATIONS):
        batches.close()

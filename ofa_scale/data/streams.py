"""Canonical streams: deterministic, seeded sequences of micro-batch chunks, independent of the world size.

How samples are assigned (the choice the loader documents):
- A source is read in *passes*. Pass p orders the source's shards by a permutation seeded with (seed, source, p)
  and concatenates their samples into one sequence of N samples.
- Canonical stream j of C reads the contiguous slice [j*N//C, (j+1)*N//C) of that sequence. Slices partition the
  pass, so every sample is read exactly once per pass across all streams, and slice lengths differ by at most one.
  With fewer shards than streams, several streams share a shard (each reads past the others' samples without
  keeping them); with many shards a stream opens only the shards its slice touches.
- Within a slice, samples go through a seeded shuffle buffer (seed, source, stream, pass) before decoding.
- If damaged shards or undecodable samples leave a slice short of its nominal length, the stream re-reads its own
  slice (a "refill" round, counted in stats) so that every stream still yields exactly the nominal number of
  records per pass: ranks never fall out of step, so collective training cannot hang on missing data.

A stream's position per source is `[pass, round, raw, valid]`: the pass, the refill round, the number of
shuffle-buffer outputs consumed in that round (decoded or not) and the number of valid records yielded in the pass.
Restoring a position replays the slice's reads and the shuffle buffer without decoding anything before it.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Iterator

from ofa_scale.data.stream_catalog import ShardEntry, SourceCatalog
from ofa_scale.data.stream_decode import RecordDecodeError, decode_record
from ofa_scale.data.stream_reader import ShardReadError, iter_shard_samples
from ofa_scale.errors import UserError

log = logging.getLogger(__name__)

STAT_KEYS = ("records", "skipped_shards", "decode_errors", "refilled", "dropped_epoch_remainder")


def new_stats(sources) -> dict[str, dict[str, int]]:
    return {s: dict.fromkeys(STAT_KEYS, 0) for s in sources}


def add_stats(into: dict, delta: dict) -> None:
    for source, counts in delta.items():
        target = into.setdefault(source, dict.fromkeys(STAT_KEYS, 0))
        for k, v in counts.items():
            target[k] = target.get(k, 0) + v


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings; stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stream_slice(num_samples: int, num_streams: int, stream: int) -> tuple[int, int]:
    """Half-open range of pass positions read by `stream`."""
    return stream * num_samples // num_streams, (stream + 1) * num_samples // num_streams


def pass_shard_order(catalog: SourceCatalog, seed: int, pass_index: int) -> list[ShardEntry]:
    order = list(catalog.shards)
    random.Random(derive_seed(seed, "shards", catalog.source, pass_index)).shuffle(order)
    return order


def slice_segments(shards: list[ShardEntry], start: int, stop: int) -> list[tuple[str, int, int]]:
    """(path, first, stop) sample-index ranges inside each shard covering pass positions [start, stop)."""
    segments = []
    offset = 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.samples)
        if lo < hi:
            segments.append((shard.path, lo - offset, hi - offset))
        offset += shard.samples
        if offset >= stop:
            break
    return segments


def buffered_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: keep `size` items, emit a random one as each new item arrives, drain at the end."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    while buf:
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


@dataclass(frozen=True)
class StreamSettings:
    """What every canonical stream of a run shares."""

    seed: int
    num_streams: int
    composition: tuple[tuple[str, int], ...]  # (source, records per micro-batch), in order
    shuffle_buffer: int
    decode_min_size: tuple[tuple[str, int], ...]
    on_corrupt: str  # "skip" | "fail"
    steps_per_epoch: int | None  # finite mode: steps per epoch; None: resampled (infinite)


class SourceStream:
    """Records of one source for one canonical stream, pass after pass."""

    def __init__(self, catalog: SourceCatalog, stream: int, settings: StreamSettings, stats: dict):
        self.catalog = catalog
        self.source = catalog.source
        self.stream = stream
        self.settings = settings
        self.stats = stats
        self.min_size = dict(settings.decode_min_size).get(self.source)
        start, stop = stream_slice(catalog.num_samples, settings.num_streams, stream)
        self.slice = (start, stop)
        self.length = stop - start
        self.pos = [0, 0, 0, 0]
        self._records: Iterator[dict] | None = None

    def seek(self, pos: list[int]) -> None:
        self.pos = [int(x) for x in pos]
        self._records = None

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos[3] >= self.length:
                self.seek([self.pos[0] + 1, 0, 0, 0])
            if self._records is None:
                self._records = self._pass_records(*self.pos)
            out.append(next(self._records))
        return out

    def _raw_samples(self, pass_index: int, replaying: list[bool]) -> Iterator[dict]:
        order = pass_shard_order(self.catalog, self.settings.seed, pass_index)
        for path, first, stop in slice_segments(order, *self.slice):
            try:
                yield from iter_shard_samples(path, first, stop)
            except ShardReadError as exc:
                if self.settings.on_corrupt == "fail":
                    raise UserError(f"shard is damaged ({exc}); re-create it (ofa-preprocess shards --resume) "
                                    f"or set loader.on_corrupt=skip") from None
                if not replaying[0]:
                    log.warning("skipping the rest of a damaged shard (%s)", exc)
                    self.stats[self.source]["skipped_shards"] += 1

    def _pass_records(self, pass_index: int, round_: int, raw: int, valid: int) -> Iterator[dict]:
        """Valid records of a pass from a position; keeps self.pos at the position after the last yield."""
        while True:
            rng = random.Random(derive_seed(self.settings.seed, "shuffle", self.source, self.stream,
                                            pass_index, round_))
            replaying = [raw > 0]
            shuffled = buffered_shuffle(self._raw_samples(pass_index, replaying), self.settings.shuffle_buffer,
                                        rng)
            produced = 0
            for index, sample in enumerate(shuffled):
                if index < raw:  # fast-forward: these were consumed before the restore; skip without decoding
                    replaying[0] = index + 1 < raw
                    continue
                replaying[0] = False
                try:
                    record = decode_record(sample, self.source, self.min_size)
                except RecordDecodeError as exc:
                    if self.settings.on_corrupt == "fail":
                        raise UserError(f"{exc} in shard {sample['__shard__']}; re-create the shard or set "
                                        f"loader.on_corrupt=skip") from None
                    log.warning("skipping an undecodable sample: %s", exc)
                    self.stats[self.source]["decode_errors"] += 1
                    self.pos = [pass_index, round_, index + 1, valid]
                    continue
                valid += 1
                produced += 1
                self.pos = [pass_index, round_, index + 1, valid]
                self.stats[self.source]["records"] += 1
                if round_ > 0:
                    self.stats[self.source]["refilled"] += 1
                yield record
                if valid >= self.length:
                    return
            if produced == 0 and raw == 0:
                raise UserError(f"canonical stream {self.stream} found no readable '{self.source}' sample in its "
                                f"slice of pass {pass_index}; repair or remove the damaged shards")
            log.warning("stream %d of '%s' is %d records short in pass %d after damaged data; re-reading its "
                        "slice to refill", self.stream, self.source, self.length - valid, pass_index)
            round_, raw = round_ + 1, 0
            self.pos = [pass_index, round_, 0, valid]


class CanonicalStream:
    """Stream j: its t-th chunk is the t-th micro-batch of records (composition counts per source, in order)."""

    def __init__(self, index: int, catalogs: dict[str, SourceCatalog], settings: StreamSettings, stats: dict):
        self.index = index
        self.settings = settings
        self.step = 0
        self.sources = {s: SourceStream(catalogs[s], index, settings, stats) for s, _ in settings.composition}
        self.stats = stats

    def state(self) -> dict:
        return {"step": self.step, "sources": {s: list(src.pos) for s, src in self.sources.items()}}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])
        for s, src in self.sources.items():
            src.seek(state["sources"][s])

    def next_chunk(self) -> list[dict]:
        t = self.step
        spe = self.settings.steps_per_epoch
        records = []
        slot = 0
        for source, count in self.settings.composition:
            src = self.sources[source]
            if spe is not None and src.pos[0] < t // spe:
                src.seek([t // spe, 0, 0, 0])  # finite mode: a new epoch starts every stream on a new pass
            for record in src.take(count):
                record["seed"] = derive_seed(self.settings.seed, "record", self.index, t, slot)
                slot += 1
                records.append(record)
            if spe is not None and t % spe == spe - 1:
                # The epoch's last chunk: whatever the slice still holds is the (counted) epoch remainder.
                self.stats[source]["dropped_epoch_remainder"] += src.length - src.pos[3]
        self.step += 1
        return records

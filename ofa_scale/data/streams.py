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
  records per pass: ranks never fall out of step, so collective training cannot hang on missing data. A shard
  is damaged when its tar does not read, when it ends before the sample count its catalogue lists (a cut at a
  member boundary reads as a valid, shorter tar) or, with `verify_shards`, when its sha256 differs from the
  manifest's. With `on_corrupt="fail"` any of these, or an undecodable sample, stops the run.

A stream's position per source is `[pass, round, raw, valid]`: the pass, the refill round, the number of
shuffle-buffer outputs consumed in that round (decoded or not) and the number of valid records yielded in the pass.
Restoring a position replays the slice's reads and the shuffle buffer without decoding anything before it.

Each stream counts what it met (STAT_KEYS) in its own state, so the counts travel with the stream's position:
they describe exactly the consumed micro-batches, survive a resume and sum over ranks to the same totals on any
world size. Damage is counted in the first round of a pass only (refill rounds re-read the same shards), and a
damaged shard by the one stream whose slice holds the damage point, so that summed over all streams each
damaged shard counts once per pass it is read in.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Iterator

from ofa_scale.data.stream_catalog import ShardEntry, SourceCatalog
from ofa_scale.data.shard_verify import shard_matches
from ofa_scale.data.stream_decode import RecordDecodeError, decode_record
from ofa_scale.data.stream_reader import ShardReadError, ShardTruncatedError, iter_shard_samples
from ofa_scale.errors import UserError

log = logging.getLogger(__name__)

STAT_KEYS = (
    "records",  # records yielded
    "skipped_samples",  # undecodable samples skipped
    "corrupt_shards",  # shards that do not read as tar, or (verify_shards) differ from their sha256
    "truncated_shards",  # shards ending before the sample count their catalogue lists
    "missing_samples",  # catalogued samples that damaged or truncated shards did not deliver
    "refilled",  # records re-read in refill rounds to make up for damaged data
    "dropped_epoch_remainder",  # finite mode: records left in a slice after an epoch's last step
)


def new_stats(sources) -> dict[str, dict[str, int]]:
    return {s: dict.fromkeys(STAT_KEYS, 0) for s in sources}


def add_stats(into: dict, delta: dict) -> None:
    for source, counts in delta.items():
        target = into.setdefault(source, dict.fromkeys(STAT_KEYS, 0))
        for k, v in counts.items():
            target[k] = target.get(k, 0) + v


def flat_stats(per_source: dict[str, dict[str, int]]) -> dict[str, int]:
    """`data/<key>` totals over sources, then `data/<source>/<key>`: ready to log as metrics."""
    flat = {f"data/{k}": sum(counts.get(k, 0) for counts in per_source.values()) for k in STAT_KEYS}
    for source, counts in per_source.items():
        flat.update({f"data/{source}/{k}": counts.get(k, 0) for k in STAT_KEYS})
    return flat


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
    verify_shards: bool = False  # check each shard's sha256 (from the manifest) before reading it


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
        self._entries = {shard.path: shard for shard in catalog.shards}

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

    def _raw_samples(self, pass_index: int, round_: int, replaying: list[bool]) -> Iterator[dict]:
        order = pass_shard_order(self.catalog, self.settings.seed, pass_index)
        for path, first, stop in slice_segments(order, *self.slice):
            shard = self._entries[path]
            try:
                if self.settings.verify_shards and not shard_matches(path, shard.sha256):
                    raise ShardReadError(f"{path} does not match the sha256 manifest.json lists for it",
                                         available=0)
                yield from iter_shard_samples(path, first, stop)
            except ShardReadError as exc:
                # Counted before a save and replayed after a restore, or met again in a refill round: once.
                self._damaged(shard, first, stop, exc, count=round_ == 0 and not replaying[0])

    def _damaged(self, shard: ShardEntry, first: int, stop: int, exc: ShardReadError, count: bool) -> None:
        if isinstance(exc, ShardTruncatedError):
            what = (f"shard {shard.path} holds only {exc.available} of the {shard.samples} samples its catalogue "
                    f"(manifest.json) lists")
        else:
            what = f"shard is damaged ({exc})"
        if self.settings.on_corrupt == "fail":
            raise UserError(f"{what}; re-create it (ofa-preprocess shards --resume) or set "
                            f"data.on_corrupt=skip") from None
        if not count:
            return
        counts = self.stats[self.source]
        counts["missing_samples"] += max(0, stop - max(first, exc.available))
        if first <= exc.available < stop:  # this stream's slice holds the damage point: count the shard here
            counts[exc.kind] += 1
            log.warning("skipping the rest of a damaged shard: %s", what)

    def _pass_records(self, pass_index: int, round_: int, raw: int, valid: int) -> Iterator[dict]:
        """Valid records of a pass from a position; keeps self.pos at the position after the last yield."""
        while True:
            rng = random.Random(derive_seed(self.settings.seed, "shuffle", self.source, self.stream,
                                            pass_index, round_))
            replaying = [raw > 0]
            shuffled = buffered_shuffle(self._raw_samples(pass_index, round_, replaying),
                                        self.settings.shuffle_buffer, rng)
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
                                        f"data.on_corrupt=skip") from None
                    if round_ == 0:  # a refill round meets the same sample again
                        log.warning("skipping an undecodable sample: %s", exc)
                        self.stats[self.source]["skipped_samples"] += 1
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

    def __init__(self, index: int, catalogs: dict[str, SourceCatalog], settings: StreamSettings):
        self.index = index
        self.settings = settings
        self.step = 0
        self.stats = new_stats(s for s, _ in settings.composition)
        self.sources = {s: SourceStream(catalogs[s], index, settings, self.stats) for s, _ in settings.composition}

    def state(self) -> dict:
        # Only non-zero counts: the state of every stream travels with each micro-batch and into checkpoints.
        stats = {s: {k: v for k, v in counts.items() if v} for s, counts in self.stats.items()}
        return {"step": self.step, "sources": {s: list(src.pos) for s, src in self.sources.items()},
                "stats": stats}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])
        for s, src in self.sources.items():
            src.seek(state["sources"][s])
        for s, counts in self.stats.items():  # states saved before the counts were kept have none
            for k in counts:
                counts[k] = int(state.get("stats", {}).get(s, {}).get(k, 0))

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

import random

from ofa_scale.data.stream_catalog import ShardEntry
from ofa_scale.data.streams import buffered_shuffle, derive_seed, slice_segments, stream_slice


def test_stream_slices_partition_a_pass():
    for n in (1, 7, 24, 101):
        for c in (1, 3, 4, 8):
            covered = []
            for j in range(c):
                start, stop = stream_slice(n, c, j)
                covered.extend(range(start, stop))
                assert (n // c) <= stop - start <= -(-n // c)
            assert covered == list(range(n))


def test_slice_segments_map_positions_to_shards():
    shards = [ShardEntry("a", 5), ShardEntry("b", 3), ShardEntry("c", 4)]
    assert slice_segments(shards, 0, 12) == [("a", 0, 5), ("b", 0, 3), ("c", 0, 4)]
    assert slice_segments(shards, 4, 9) == [("a", 4, 5), ("b", 0, 3), ("c", 0, 1)]
    assert slice_segments(shards, 6, 7) == [("b", 1, 2)]


def test_buffered_shuffle_is_a_seeded_permutation():
    items = list(range(50))
    a = list(buffered_shuffle(iter(items), 8, random.Random(3)))
    b = list(buffered_shuffle(iter(items), 8, random.Random(3)))
    c = list(buffered_shuffle(iter(items), 8, random.Random(4)))
    assert sorted(a) == items and a == b and a != c and a != items
    assert list(buffered_shuffle(iter(items), 1, random.Random(3))) == items


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, "record", 0, 5, 2) == derive_seed(1, "record", 0, 5, 2)
    assert derive_seed(1, "record", 0, 5, 2) != derive_seed(1, "record", 0, 5, 3)
    assert 0 <= derive_seed("x") < 2**63

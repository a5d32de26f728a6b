"""OFA's bucket functions and position ids (spec §4.4–§4.6) against the spec's verified values."""

import torch

from ofa_scale.model.positions import (
    code_position_ids,
    image_relative_buckets,
    patch_position_ids,
    token_relative_buckets,
)


def test_token_buckets_match_spec_values():
    table = token_relative_buckets(256, 1024)
    assert table.shape == (1024, 1024) and table.dtype == torch.long

    def bucket(rel):  # rel = query - key
        return table[rel, 0].item() if rel >= 0 else table[0, -rel].item()

    expected = {0: 255, 1: 256, -1: 254, 128: 383, 129: 384, 1023: 510, -1023: 0}
    assert {rel: bucket(rel) for rel in expected} == expected
    assert table.min().item() == 0 and table.max().item() == 510
    # exact band: index depends only on i - j
    assert torch.equal(table[200, 100:300], table[300, 200:400])
    # log band is monotone in the distance
    far = torch.tensor([bucket(r) for r in range(129, 1024)])
    assert torch.all(far[1:] >= far[:-1])


def test_image_buckets_match_spec_values():
    table = image_relative_buckets(42)
    assert table.shape == (1765, 1765)
    assert table[0, 5].item() == 6889 and table[5, 0].item() == 6890 and table[0, 0].item() == 6891
    assert table[1:, 1:].max().item() == 6888

    def pid(r, c):
        return r * 42 + c + 1

    for (rq, cq), (rk, ck) in [((0, 0), (0, 0)), ((3, 7), (1, 2)), ((0, 41), (41, 0)), ((10, 10), (11, 9))]:
        assert table[pid(rq, cq), pid(rk, ck)].item() == (rq - rk + 41) * 83 + (cq - ck + 41)


def test_patch_ids_use_stride_42_and_start_at_1():
    ids = patch_position_ids(16, 16)
    assert ids.shape == (256,)
    assert ids[:3].tolist() == [1, 2, 3] and ids[16].item() == 43 and ids[-1].item() == 15 * 42 + 16


def test_code_position_ids():
    ids = code_position_ids(16)
    assert ids.shape == (1026,)
    assert ids[0].item() == 0 and ids[1].item() == 1 and ids[17].item() == 43
    assert torch.all(ids[257:] == 1024)
    assert code_position_ids(32).shape == (1794,)

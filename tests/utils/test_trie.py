import torch

from ofa_scale.utils.trie import Trie

BOS, EOS = 0, 2
ANSWERS = [[10, 11], [10, 12, 13], [20], [10]]


def test_next_layer_follows_inserted_answers():
    trie = Trie.from_answers(ANSWERS, bos=BOS, eos=EOS)
    assert len(trie) == 4
    assert trie.get_next_layer([]) == [BOS]
    assert trie.get_next_layer([BOS]) == [10, 20]
    assert trie.get_next_layer([BOS, 10]) == [11, 12, EOS]  # "10" is itself an answer
    assert trie.get_next_layer([BOS, 10, 12]) == [13]
    assert trie.get_next_layer([BOS, 10, 12, 13]) == [EOS]
    assert trie.contains([BOS, 20, EOS]) and not trie.contains([BOS, 21])


def test_prefix_outside_the_tree_allows_only_eos():
    trie = Trie.from_answers(ANSWERS, bos=BOS, eos=EOS)
    assert trie.get_next_layer([BOS, 99]) == [EOS]
    assert trie.get_next_layer([BOS, 10, 12, 13, EOS]) == [EOS]  # past the end of a sequence


def test_duplicates_are_counted_once():
    trie = Trie.from_answers([[5], [5], [5, 6]])
    assert len(trie) == 2


def test_answer_masks_rows_match_next_layers():
    trie = Trie.from_answers(ANSWERS, bos=BOS, eos=EOS)
    masks = trie.answer_masks([10, 12, 13], vocab_size=30, bos=BOS)
    assert masks.shape == (4, 30) and masks.dtype == torch.bool
    expected = [[10, 20], [11, 12, EOS], [13], [EOS]]
    for row, allowed in zip(masks, expected):
        assert row.nonzero().flatten().tolist() == sorted(allowed)

"""OFA-CN's BERT WordPiece tokenizer (`bpe=bert`, spec §10.1): ids, layout, decoding.

The expected ids are worked out by hand from the vocab files written here (id = 4 + line index, BERT's rules:
lower-case, accents stripped, every CJK character and punctuation mark a word of its own, greedy
longest-match-first WordPiece with `##` continuations, a word WordPiece cannot cover -> [UNK]), or copied from
spec §10.1.2's examples (verified against OFA's own tokenizer) - never produced by the tokenizer under test.
"""

from __future__ import annotations

import pickle

import pytest

from ofa_scale.data.tokenizer import clear_tokenizer_cache, load_tokenizer
from ofa_scale.errors import UserError

# A small vocab.txt: line i -> id 4 + i. U+2028 (a line separator to str.splitlines) is a piece of its own, as
# in BERT-CN's vocab, so the ids after it only line up if lines are split on "\n" alone.
SMALL_VOCAB = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", "?", ",", ".",  # 4..13
               "0", "1", "2", "##0", "##1", "##2", "a", "the", "play", "##ing",  # 14..23
               "##s", "##er", "cafe", "一", "个", "男", "人", "红", "色", "圆",  # 24..33
               "形", "，", "？", "##play", "p", "##lay", "\u2028", "球", "##10", "iphone"]  # 34..43
PAD, UNK, CLS, MASK, EXCL, QUESTION, COMMA = 4, 6, 7, 9, 10, 11, 12
TWO, CONT_0, CONT_1, CONT_2, A, THE, PLAY, ING, S, ER, CAFE = 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26
YI, GE, NAN, REN, HONG, SE, YUAN, XING, FW_COMMA, FW_QUESTION = 27, 28, 29, 30, 31, 32, 33, 34, 35, 36
CONT_PLAY, P, CONT_LAY, LINE_SEP, QIU, CONT_10, IPHONE = 37, 38, 39, 40, 41, 42, 43

HAND_CASES = [
    # CJK characters split one by one; 在 and 打 are not in the vocab: each alone becomes [UNK]
    ("一个男人在打球", [YI, GE, NAN, REN, UNK, UNK, QIU]),
    # lower-cased; "playing" -> play ##ing (longest first: "play" beats "p"); "2010" -> 2 ##0 ##10 (after "2"
    # the longest continuation is ##0 since ##010/##01 do not exist, then ##10 beats ##1); "!" splits off
    (" Playing 2010 a!", [PLAY, ING, TWO, CONT_0, CONT_10, A, EXCL]),
    # accents stripped (é -> e), punctuation split, "players" -> play ##er ##s
    ("Café, the PLAYERS?", [CAFE, COMMA, THE, PLAY, ER, S, QUESTION]),
    # full-width punctuation is punctuation too; Latin letters and digits glued to each other stay one word
    ("红色圆形，iPhone2", [HONG, SE, YUAN, XING, FW_COMMA, IPHONE, CONT_2]),
    # a word with any uncoverable rest is one [UNK] (not "play" + [UNK]); digits next to CJK split at the CJK
    ("playx plays 2球", [UNK, PLAY, S, TWO, QIU]),
    # BERT's own specials written in text stay whole (case-sensitive, as HF's BertTokenizer); whitespace of any
    # kind (tab, newline, U+2028) separates words; control characters are dropped
    ("[MASK] 一\t个\n男\u2028人\x07", [MASK, YI, GE, NAN, REN]),
    ("[mask]", [UNK, UNK, UNK]),  # not the special: "[", "mask", "]" are not in the vocab
    ("", []),
]

# Spec §10.1.2: BERT-CN's vocab.txt has 21,128 lines; these pieces sit at these fairseq ids (4 + line index).
SPEC_PIECES = {
    "[PAD]": 4, "[UNK]": 104, "[CLS]": 105, "[SEP]": 106, "[MASK]": 107, "<S>": 108, "<T>": 109, "!": 110, '"': 111,
    "0": 125, "?": 140, "a": 147, "一": 675, "的": 4642, "，": 8028, "？": 8047, "##a": 8143,
    "图": 1749, "片": 4279, "描": 2993, "述": 6839, "了": 753, "什": 788, "么": 724, "内": 1083, "容": 2163,
    "上": 681, "文": 3156, "字": 2103, "是": 3225, "这": 6825, "段": 3671, "穿": 4963, "白": 4639, "衬": 6141,
    "衫": 6140, "女": 1961, "人": 786, "哪": 1529, "个": 706, "区": 1281, "域": 1822, "男": 4515, "在": 1766,
    "骑": 7748, "自": 5636, "行": 6125, "车": 6760, "what": 9104, "do": 8899, "##es": 8337, "the": 8178,
    "audio": 11702, "say": 10118,
}
# Spec §10.1.2's example encodings (fairseq ids, no bos/eos), verified there against OFA.
SPEC_EXAMPLES = [
    ("图片描述了什么内容?", [1749, 4279, 2993, 6839, 753, 788, 724, 1083, 2163, 140]),
    ("图片上的文字是什么?", [1749, 4279, 681, 4642, 3156, 2103, 3225, 788, 724, 140]),
    ('这段文字" 穿白衬衫的女人 "描述的是哪个区域？', [6825, 3671, 3156, 2103, 111, 4963, 4639, 6141, 6140, 4642,
                                                    1961, 786, 111, 2993, 6839, 4642, 3225, 1529, 706, 1281,
                                                    1822, 8047]),
    (" 一个男人在骑自行车", [675, 706, 4515, 786, 1766, 7748, 5636, 6125, 6760]),
    (" what does the audio say?", [9104, 8899, 8337, 8178, 11702, 10118, 140]),
]


def write_vocab(directory, pieces) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_bytes(("\n".join(pieces) + "\n").encode("utf-8"))
    return str(directory)


def spec_sized_vocab() -> list[str]:
    lines = [f"[fill{i}]" for i in range(21128)]
    for piece, fairseq_id in SPEC_PIECES.items():
        lines[fairseq_id - 4] = piece
    return lines


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load_tokenizer("bert", write_vocab(tmp_path_factory.mktemp("bert_small"), SMALL_VOCAB))


@pytest.fixture(scope="module")
def spec_tok(tmp_path_factory):
    return load_tokenizer("bert", write_vocab(tmp_path_factory.mktemp("bert_spec"), spec_sized_vocab()))


@pytest.mark.parametrize("text,ids", HAND_CASES)
def test_ids_follow_berts_rules_by_hand(small, text, ids):
    assert small.encode(text) == ids
    assert small.encode_batch([text, text]) == [ids, ids]


def test_small_layout_and_line_splitting(small):
    n_text = len(SMALL_VOCAB)
    assert (small.mask, small.code_offset, small.bin_offset) == (4 + n_text, 5 + n_text, 5 + n_text + 8192)
    assert len(small) == 5 + n_text + 8192 + 1000
    assert [small.symbol(i) for i in (0, 1, 2, 3)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert small.symbol(LINE_SEP) == "\u2028" and small.symbol(QIU) == "球" and small.symbol(IPHONE) == "iphone"
    assert small.index("[UNK]") == UNK and small.index("no such piece") == small.unk


def test_spec_layout_and_example_ids(spec_tok):
    """§10.1.2: 30,325 ids; <mask> 21132, <code_0> 21133, <bin_0> 29325; OFA's encodings of its prompts."""
    tok = spec_tok
    assert len(tok) == 30325
    assert (tok.mask, tok.code_offset, tok.bin_offset) == (21132, 21133, 29325)
    assert tok.code_token(0) == 21133 and tok.code_token(8191) == 29324
    assert tok.bin_token(0) == 29325 and tok.bin_token(999) == 30324 and tok.bin_index(29325 + 17) == 17
    assert [tok.symbol(i) for i in (21132, 21133, 29324, 29325, 30324)] == [
        "<mask>", "<code_0>", "<code_8191>", "<bin_0>", "<bin_999>"]
    for text, ids in SPEC_EXAMPLES:
        assert tok.encode(text) == ids, text
    # an out-of-vocabulary piece is BERT's [UNK] (104), not fairseq's <unk> (3)
    assert tok.encode("骆驼") == [104, 104]
    assert tok.encode_bins("<bin_12> <bin_999> <code_5>") == [29337, 30324, 21138]


def test_decode_is_fairseqs_bert_decode(small, spec_tok):
    # pieces joined by spaces, ## glued, no space before ASCII ? ! , . (HF clean_up_tokenization)
    assert small.decode([PLAY, ING, TWO, CONT_0, CONT_10, A, EXCL]) == "playing 2010 a!"
    assert small.decode([CAFE, COMMA, THE, PLAY, ER, S, QUESTION]) == "cafe, the players?"
    assert small.decode([YI, GE, NAN, REN, UNK, UNK, QIU]) == "一 个 男 人 [UNK] [UNK] 球"
    # full-width punctuation keeps its space; a continuation at the start keeps its ##
    assert small.decode([HONG, SE, FW_COMMA, YUAN, XING, FW_QUESTION]) == "红 色 ， 圆 形 ？"
    assert small.decode([CONT_PLAY, ING]) == "##playing"
    assert spec_tok.decode(SPEC_EXAMPLES[0][1]) == "图 片 描 述 了 什 么 内 容?"
    # the decoded text encodes back to the same ids
    for text, ids in HAND_CASES[:5]:
        assert small.encode(small.decode(ids)) == ids, text
    for text, ids in SPEC_EXAMPLES:
        assert spec_tok.encode(spec_tok.decode(ids)) == ids, text


def test_codes_bins_and_specials_decode_by_name(small):
    ids = [small.bos, YI, GE, small.bin_token(3), small.bin_token(999), small.code_token(7), small.mask, small.eos]
    assert small.decode(ids) == "<s> 一 个 <bin_3> <bin_999> <code_7> <mask> </s>"
    assert small.decode(ids, skip_special_tokens=True) == "一 个 <bin_3> <bin_999> <code_7> <mask>"
    assert small.encode_bins("<bin_3> <bin_999>") == [small.bin_token(3), small.bin_token(999)]


def test_word_starts_are_pieces_without_continuation(small):
    ids = [PLAY, ING, YI, CONT_0, PAD, small.code_token(0), small.bin_token(0), small.mask, small.bos]
    assert small.word_start_mask(ids).tolist() == [True, False, True, False, True, True, True, True, True]


def test_cached_pickled_and_errors(tmp_path, small):
    assert load_tokenizer("bert", small.path) is small
    assert pickle.loads(pickle.dumps(small)) is small
    clear_tokenizer_cache()
    again = load_tokenizer("bert", small.path)
    assert again is not small and again.encode("一个") == [YI, GE]
    assert len(load_tokenizer("bert", small.path, num_bins=10, num_codes=0)) == 5 + len(SMALL_VOCAB) + 10
    with pytest.raises(UserError, match="vocab.txt"):
        load_tokenizer("bert", tmp_path)
    with pytest.raises(UserError, match=r"\[UNK\]"):
        load_tokenizer("bert", write_vocab(tmp_path / "no_unk", ["a", "b"]))

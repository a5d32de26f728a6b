"""OFA-CN's vocabulary (`bpe=bert`, spec §10.1): BERT's Chinese WordPiece over a user-supplied `vocab.txt`.

OFA builds fairseq's `bert` BPE (HF `BertTokenizer(vocab.txt, do_lower_case=True)`) and looks each emitted piece
string up in `utils/BERT_CN_dict/dict.txt`, which lists vocab.txt's pieces in the same order. So a piece's id is
4 + its line index in vocab.txt, and the layout of spec §10.1.2 follows from OFATokenizer:

    0..3             <s> <pad> </s> <unk>
    4 .. 21131       vocab.txt's 21,128 pieces ([PAD]=4, [UNK]=104, 一=675, ...)
    21132            <mask>
    21133 + i        <code_i>   (i < 8192)
    29325 + i        <bin_i>    (i < 1000)          30,325 ids in all

The text model is the `tokenizers` library's BERT pipeline: BertNormalizer (control characters dropped,
whitespace unified, a space around every CJK character, accents stripped, lower-cased), BertPreTokenizer
(split on whitespace and on every punctuation character) and greedy longest-match-first WordPiece with `##`
continuations; a word WordPiece cannot cover becomes `[UNK]` (104), never fairseq's <unk> (3), as in OFA.
BERT's own [PAD]/[UNK]/[CLS]/[SEP]/[MASK] are ordinary text pieces here; written literally in text they stay
one piece each, as HF's BertTokenizer keeps its special tokens unsplit.

Decoding is fairseq's BertBPE.decode: pieces joined by spaces with `##` continuations glued, then HF's
`clean_up_tokenization` (no space before . ? ! , and English contractions). Decoded Chinese therefore has a space
between every character ("一 个 男 人"); encode(decode(ids)) gives the ids back, decode(encode(s)) is the
normalised text, not s. A piece is a word start (spec §2.4, OFA's `is_beginning_of_word`) unless it starts
with `##`, so every CJK character starts a word.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ofa_scale.data.tokenizer import (DEFAULT_NUM_BINS, DEFAULT_NUM_CODES, SPECIAL_SYMBOLS, OFATokenizer,
                                      TokenizersEncoding, _existing_dir)
from ofa_scale.errors import UserError

BERT_VOCAB_FILE = "vocab.txt"
BERT_FILES = (BERT_VOCAB_FILE,)
CONTINUATION = "##"
BERT_UNK = "[UNK]"
# The tokens HF's BertTokenizer never splits when they appear in text (its special tokens).
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# HF transformers' `clean_up_tokenization`, which fairseq's BertBPE.decode applies (in this order). The
# `tokenizers` WordPiece decoder's own clean-up also turns " do not" into " don't", so it is not used.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def read_bert_vocab(path: Path) -> list[str]:
    """vocab.txt's pieces, one per line, in order. Lines split on "\\n" only: BERT-CN's vocab holds U+2028
    (a line separator to str.splitlines) as a piece of its own."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); pass BERT's vocab.txt (one WordPiece per line)") from None
    pieces = text.split("\n")
    if pieces and pieces[-1] == "":
        pieces.pop()
    pieces = [p[:-1] if p.endswith("\r") else p for p in pieces]
    if not pieces:
        raise UserError(f"{path} is empty; pass BERT's vocab.txt (one WordPiece per line)")
    return pieces


def clean_up_tokenization(text: str) -> str:
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


class BertWordPieceTokenizer(TokenizersEncoding, OFATokenizer):
    """OFA-CN's `bpe=bert` tokenizer over `<dir>/vocab.txt` (OFA's utils/BERT_CN_dict); see the module docstring."""

    kind = "bert"

    def __init__(self, bpe_dir: str | os.PathLike, num_codes: int = DEFAULT_NUM_CODES,
                 num_bins: int = DEFAULT_NUM_BINS):
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

        bpe_dir = _existing_dir(bpe_dir, "bert", "vocab.txt (OFA's utils/BERT_CN_dict)")
        vocab_path = bpe_dir / BERT_VOCAB_FILE
        if not vocab_path.is_file():
            raise UserError(f"BERT tokenizer directory {bpe_dir} has no {BERT_VOCAB_FILE}; pass the directory "
                            f"holding BERT's vocab.txt (OFA-CN: utils/BERT_CN_dict)")
        pieces = read_bert_vocab(vocab_path)
        vocab: dict[str, int] = {}
        for i, piece in enumerate(pieces):  # first occurrence wins, as in fairseq's dictionary lookup
            vocab.setdefault(piece, len(SPECIAL_SYMBOLS) + i)
        if BERT_UNK not in vocab:
            raise UserError(f"{vocab_path} has no {BERT_UNK} line; BERT's WordPiece maps unknown words to it, "
                            f"use a BERT vocab.txt")
        tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token=BERT_UNK, continuing_subword_prefix=CONTINUATION,
                                        max_input_chars_per_word=100))
        tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                   lowercase=True)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=False)
        # Matched in the raw text before normalisation (case-sensitive), as HF's slow tokenizer does.
        tk.add_special_tokens([AddedToken(t, normalized=False) for t in BERT_SPECIALS if t in vocab])
        self._tk = tk

        word_start = np.array([not p.startswith(CONTINUATION) for p in pieces], dtype=bool)
        decodable = np.ones(len(pieces), dtype=bool)
        super().__init__(pieces, word_start, decodable, num_codes, num_bins, bpe_dir)

    def pieces(self, text: str) -> list[str]:
        """The WordPiece strings of `text` (fairseq BertBPE.encode's output, split)."""
        return self._tk.encode(text, add_special_tokens=False).tokens

    def _decode_text(self, ids: list[int]) -> str:
        return clean_up_tokenization(self._tk.decode(ids, skip_special_tokens=False))

    def _reload_args(self) -> tuple:
        return ("bert", str(self.path), self.num_codes, self.num_bins)


__all__ = ["BERT_FILES", "BertWordPieceTokenizer", "clean_up_tokenization", "read_bert_vocab"]

"""Tokenizers: OFA's GPT-2 BPE ids (spec §3), word starts (spec §2.4), and the SentencePiece alternative."""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from ofa_scale.cli import preprocess
from ofa_scale.data.tokenizer import clear_tokenizer_cache, load_tokenizer, train_sentencepiece
from ofa_scale.errors import ConfigError, UserError
from ofa_scale.data.tokenizer_train import CHUNK_CHARS, _training_sentences

# Every example of spec §3 (fairseq ids, verified against OFA).
SPEC_EXAMPLES = [
    (" what does the image describe?", [99, 473, 5, 2274, 6190, 116]),
    (" yes", [4420]),
    (" no", [117]),
    (" maybe", [2085]),
    (" positive", [1313]),
    (" negative", [2430]),
    (' what is the complete text of " "?', [99, 16, 5, 1498, 2788, 9, 22, 22, 116]),
    (" what is the image in the middle part?", [99, 16, 5, 2274, 11, 5, 1692, 233, 116]),
    (" what are the objects in the image?", [99, 32, 5, 8720, 11, 5, 2274, 116]),
    ("  what does the region describe? region:", [1437, 99, 473, 5, 976, 6190, 116, 976, 35]),
    (' which region does the text " a man " describe?', [61, 976, 473, 5, 2788, 22, 10, 313, 22, 6190, 116]),
]

VARIED_TEXTS = [
    "",
    " ",
    "plain words",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nand runs      of spaces",
    "Punctuation!? (brackets) [x] {y} \"quotes\" 'single' — dashes – and … ellipses; a:b, c.d",
    "digits 0 12 345 6789 3.14159 1,000,000 2026-11-25 #42 $9.99 50%",
    "unicode: café naïve Zürich Ελληνικά русский 日本語の文 한국어 עברית العربية",
    "emoji 😀🎉👍🏽 and combining e\u0301 and zero\u200bwidth",
    "it's they're we've I'm you'll he'd 'quoted' CAPITALS MiXeD",
    "<bin_3> <code_7> <mask> <s> </s> <|endoftext|> look like symbols but are text",
]


@pytest.fixture(scope="module")
def gpt2(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


# ----------------------------------------------------------------------------------------------- GPT-2 BPE
def test_gpt2_layout_matches_spec(gpt2, bpe_dir):
    assert len(gpt2) == 59457
    assert (gpt2.bos, gpt2.pad, gpt2.eos, gpt2.unk) == (0, 1, 2, 3)
    assert (gpt2.mask, gpt2.code_offset, gpt2.bin_offset) == (50264, 50265, 58457)
    assert (gpt2.num_codes, gpt2.num_bins) == (8192, 1000)
    assert gpt2.code_token(0) == 50265 and gpt2.code_token(8191) == 58456
    assert gpt2.bin_token(0) == 58457 and gpt2.bin_token(999) == 59456
    assert gpt2.code_index(58456) == 8191 and gpt2.bin_index(58457 + 17) == 17
    # id = 4 + line index of dict.txt; the first lines are 13, 262, 11 and the last three are madeupwords.
    lines = (bpe_dir / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert [gpt2.symbol(4 + i) for i in (0, 1, 2)] == [ln.split()[0] for ln in lines[:3]] == ["13", "262", "11"]
    assert [gpt2.symbol(i) for i in (50261, 50262, 50263)] == ["madeupword0000", "madeupword0001", "madeupword0002"]
    assert [gpt2.symbol(i) for i in (0, 1, 2, 3, 50264, 50265, 59456)] == [
        "<s>", "<pad>", "</s>", "<unk>", "<mask>", "<code_0>", "<bin_999>"]
    with pytest.raises(ValueError):
        gpt2.code_token(8192)
    with pytest.raises(ValueError):
        gpt2.bin_token(-1)
    with pytest.raises(ValueError):
        gpt2.bin_index(gpt2.code_token(3))


@pytest.mark.parametrize("text,ids", SPEC_EXAMPLES)
def test_gpt2_spec_example_ids(gpt2, text, ids):
    assert gpt2.encode(text) == ids
    assert gpt2.decode(ids) == text


def test_gpt2_ids_go_through_the_fairseq_dictionary(gpt2, bpe_dir):
    # Independent check of the mapping: GPT-2 id from encoder.json, then its dict.txt line.
    encoder = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
    line_of = {ln.split()[0]: i for i, ln in enumerate((bpe_dir / "dict.txt").read_text().splitlines())}
    for piece in ("Ġthe", "Ġcat", ",", "Ġ\u00e5\u00a4\u00a7", "ĠĠĠ", "<|endoftext|>"):
        if piece in encoder:
            assert gpt2.index(str(encoder[piece])) == 4 + line_of[str(encoder[piece])]
    assert gpt2.encode(" the") == [4 + line_of[str(encoder["Ġthe"])]]


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_gpt2_round_trip(gpt2, text):
    ids = gpt2.encode(text)
    assert all(4 <= i < gpt2.mask for i in ids)
    assert gpt2.decode(ids) == text


def test_gpt2_symbol_strings_in_text_are_plain_text(gpt2):
    # OFA's encode_text(use_bpe=True) never recognises "<bin_3>": it is BPE'd like any text.
    ids = gpt2.encode(" <bin_3>")
    assert len(ids) > 1 and gpt2.bin_token(3) not in ids


def test_gpt2_encode_batch_equals_encode(gpt2):
    texts = VARIED_TEXTS + [t for t, _ in SPEC_EXAMPLES]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    assert gpt2.encode_batch([]) == []
    with pytest.raises(TypeError):
        gpt2.encode(b"bytes")


def test_gpt2_decode_renders_symbols_by_name(gpt2):
    box = [gpt2.bin_token(i) for i in (12, 40, 300, 511)]
    ids = [gpt2.bos] + box + gpt2.encode(" person") + [gpt2.mask] + [gpt2.code_token(7), gpt2.code_token(8191)]
    ids += gpt2.encode("tail") + [50261, gpt2.eos]
    assert gpt2.decode(ids) == ("<s> <bin_12> <bin_40> <bin_300> <bin_511> person <mask> <code_7> <code_8191> "
                                "tail madeupword0000 </s>")
    assert gpt2.decode(ids, skip_special_tokens=True).startswith("<bin_12>")
    assert gpt2.decode(np.array(box)) == "<bin_12> <bin_40> <bin_300> <bin_511>"
    assert gpt2.decode([]) == ""
    with pytest.raises(ValueError):
        gpt2.decode([len(gpt2)])
    with pytest.raises(ValueError):
        gpt2.decode([-1])


def test_gpt2_encode_bins_is_the_use_bpe_false_path(gpt2):
    region = "<bin_12> <bin_40> <bin_300> <bin_511>"
    ids = gpt2.encode_bins(region)
    assert ids == [58457 + 12, 58457 + 40, 58457 + 300, 58457 + 511]
    assert gpt2.encode_bins(gpt2.decode(ids)) == ids
    # Detection targets: bin tokens plus the already-BPE'd label (GPT-2 ids as strings), all dictionary lookups.
    person = gpt2.encode(" person")
    label = " ".join(gpt2.symbol(i) for i in person)
    assert gpt2.encode_bins(f"  {region}\t{label} <code_5> <mask> </s> ") == ids + person + [
        gpt2.code_token(5), gpt2.mask, gpt2.eos]
    assert gpt2.encode_bins("not_a_symbol") == [gpt2.unk]
    with pytest.raises(ValueError, match="outside"):
        gpt2.encode_bins("<bin_1000>")


def test_gpt2_word_starts_follow_the_decoded_leading_space(gpt2):
    table = gpt2.word_start_table
    assert table.shape == (len(gpt2),) and table.dtype == bool
    # Definition (spec §2.4): specials and madeupwords are starts; a text token iff it decodes with a space.
    expected = np.array([gpt2.decode([i]).startswith(" ") for i in range(4, 50261)])
    assert np.array_equal(table[4:50261], expected)
    assert table[:4].all() and table[50261:50264].all()
    assert table[gpt2.mask:].all()  # <mask>, codes and bins are whole units
    ids = gpt2.encode(" what does the image describe? it's re-done")
    assert gpt2.word_start_mask(ids).tolist() == [gpt2.is_word_start(i) for i in ids]
    words = [gpt2.decode([i]) for i in ids]
    assert [w for w, s in zip(words, gpt2.word_start_mask(ids)) if s] == [
        " what", " does", " the", " image", " describe", " it", " re"]


def test_gpt2_cache_and_pickle_reuse_the_loaded_tokenizer(gpt2, bpe_dir):
    assert load_tokenizer("gpt2-bpe", str(bpe_dir)) is gpt2
    assert pickle.loads(pickle.dumps(gpt2)) is gpt2
    small = load_tokenizer("gpt2-bpe", bpe_dir, num_codes=16, num_bins=10)
    assert small is not gpt2 and len(small) == 50265 + 16 + 10 and small.bin_token(9) == len(small) - 1


def test_gpt2_missing_or_wrong_directory_is_a_user_error(tmp_path, bpe_dir):
    with pytest.raises(UserError, match="encoder.json, vocab.bpe and dict.txt"):
        load_tokenizer("gpt2-bpe", tmp_path / "nope")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "encoder.json").write_bytes((bpe_dir / "encoder.json").read_bytes())
    with pytest.raises(UserError, match="lacks vocab.bpe, dict.txt"):
        load_tokenizer("gpt2-bpe", partial)
    with pytest.raises(ConfigError, match="gpt2-bpe, sentencepiece"):
        load_tokenizer("wordpiece", bpe_dir)
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer("sentencepiece", bpe_dir)


# ------------------------------------------------------------------------------------------- SentencePiece
WORDS = ("the a red blue green small large circle square star triangle sits on under next to left of right "
         "how many are there what colour is it shape picture shows image café naïve über Straße 東京 数字 "
         "one two three four five six 12 345 2026").split()
# Repeated verbatim in every vl row's image column: a model that read that column would learn pieces of it.
IMAGE_B64 = base64.b64encode(b"QQQZZZXXXJJJ" * 40).decode()


SYLLABLES = "ka ri to mu sen dor al vi ne pa lo qu est ing ter un bra fel mon zi".split()
# Made-up words give the corpus enough distinct strings for a vocabulary of several hundred pieces.
MADE_UP = ["".join(random.Random(n).choices(SYLLABLES, k=2 + n % 3)) for n in range(400)]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) if rng.random() < 0.6 else rng.choice(MADE_UP) for _ in range(rng.randint(3, 14))]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", "?", "!", ""])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few thousand lines in OFA formats, with a malformed row, a non-UTF-8 row, CRLF endings and a .txt."""
    rng = random.Random(7)
    d = tmp_path_factory.mktemp("corpus")
    vl_rows = []
    for i in range(1500):
        kind = rng.choice(["caption", "qa", "visual_grounding"])
        caption = _sentence(rng) if kind != "qa" else ""
        question = _sentence(rng) if kind == "qa" else ""
        refs = "1.0|!+yes" if kind == "qa" else ("1,2,30,40" if kind == "visual_grounding" else "")
        vl_rows.append(f"id.{i}\t{IMAGE_B64}\t{caption}\t{question}\t{refs}\tcircle&&star\tcoco\t{kind}")
    vl = d / "vision_language_examples.tsv"
    vl.write_bytes(("\r\n".join(vl_rows) + "\r\nonly\tthree\tcolumns\n").encode("utf-8"))
    text = d / "text_examples.tsv"
    rows = [f"t{i}\t{_sentence(rng)} {_sentence(rng)}" for i in range(1500)]
    text.write_bytes(("\n".join(rows) + "\n").encode("utf-8") + b"bad\t\xff\xfe not utf-8\n")
    txt = d / "extra.txt"
    txt.write_text("\n".join(_sentence(rng) for _ in range(200)), encoding="utf-8")
    return {"dir": d, "vl": vl, "text": text, "txt": txt}


@pytest.fixture(scope="module")
def spm_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    rc = preprocess.main(["train-tokenizer", "--input", str(corpus["vl"]), str(corpus["text"]),
                          "--vocab-size", "700", "--out", str(out)])
    assert rc == 0
    return out


def test_sentencepiece_layout(spm_dir):
    tok = load_tokenizer("sentencepiece", spm_dir)
    assert (tok.bos, tok.pad, tok.eos, tok.unk) == (0, 1, 2, 3)
    assert [tok.symbol(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (tok.mask, tok.code_offset, tok.bin_offset, len(tok)) == (700, 701, 701 + 8192, 701 + 8192 + 1000)
    assert tok.symbol(tok.mask) == "<mask>" and tok.symbol(tok.code_token(5)) == "<code_5>"
    assert tok.symbol(tok.bin_token(999)) == "<bin_999>" and tok.bin_token(999) == len(tok) - 1
    meta = json.loads((spm_dir / "tokenizer.json").read_text())
    assert meta["kind"] == "sentencepiece" and meta["format_version"] == 1
    assert meta["layout"]["vocab_size"] == len(tok) and meta["layout"]["mask"] == tok.mask
    # 3000 text rows + 1 malformed vl row + 1 non-UTF-8 text row; each vl row has exactly one text field.
    assert meta["corpus"]["lines"] == 3002 and meta["corpus"]["skipped_lines"] == 2
    assert meta["corpus"]["texts"] == 3000


def test_sentencepiece_reads_only_text_columns_lowercased(spm_dir):
    tok = load_tokenizer("sentencepiece", spm_dir)
    pieces = [tok.symbol(i) for i in range(4, tok.mask) if not tok.symbol(i).startswith("<0x")]
    assert any("circle" in p for p in pieces)  # learnt from the captions
    assert not any(frag in p for p in pieces for frag in ("QQQ", "ZZZ", "UVFR", "WlpaW"))  # never the base64
    assert not any(c.isupper() for p in pieces for c in p)  # OFA lowercases text before encoding


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_sentencepiece_round_trip(spm_dir, text):
    tok = load_tokenizer("sentencepiece", spm_dir)
    ids = tok.encode(text)
    assert all(4 <= i < tok.mask for i in ids)  # byte fallback: nothing becomes <unk>
    assert tok.decode(ids) == text


def test_sentencepiece_word_starts_and_batch(spm_dir):
    tok = load_tokenizer("sentencepiece", spm_dir)
    ids = tok.encode(" the red circle sits under the star")
    starts = tok.word_start_mask(ids)
    assert starts.tolist() == [tok.symbol(i).startswith("\u2581") for i in ids]
    assert int(starts.sum()) == 7  # one start per word
    assert tok.is_word_start(tok.bos) and tok.is_word_start(tok.bin_token(0))
    texts = VARIED_TEXTS + ["the cat", " the cat"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    the = tok.index("\u2581the")
    assert the != tok.unk and tok.encode_bins("<bin_1> <code_2> \u2581the") == [tok.bin_token(1), tok.code_token(2), the]
    assert tok.decode([tok.bin_token(1)] + tok.encode(" the") + [tok.mask]) == "<bin_1> the <mask>"
    assert pickle.loads(pickle.dumps(tok)) is tok


def test_sentencepiece_training_is_deterministic(corpus, spm_dir, tmp_path):
    again = tmp_path / "again"
    # Same files in the same order (here one through a glob): the order of sentences matters to the trainer.
    rc = preprocess.main(["train-tokenizer", "--input", str(corpus["dir"] / "vision_*.tsv"), str(corpus["text"]),
                          "--vocab-size", "700", "--out", str(again)])
    assert rc == 0
    assert (again / "spm.model").read_bytes() == (spm_dir / "spm.model").read_bytes()
    other_seed = tmp_path / "bpe"
    assert preprocess.main(["train-tokenizer", "--input", f"lines:{corpus['txt']}", str(corpus["text"]),
                            "--vocab-size", "400", "--model-type", "bpe", "--num-codes", "16", "--num-bins", "10",
                            "--out", str(other_seed)]) == 0
    tok = load_tokenizer("sentencepiece", other_seed)
    assert (tok.mask, len(tok)) == (400, 400 + 1 + 16 + 10)


def test_sampled_training_is_reproducible_across_processes(corpus, tmp_path):
    # With --max-sentences below the corpus size a sample is drawn; a fresh process must draw the same one.
    args = ["train-tokenizer", "--input", str(corpus["text"]), "--vocab-size", "500", "--max-sentences", "700",
            "--seed", "3"]
    assert preprocess.main(args + ["--out", str(tmp_path / "here")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="random")
    subprocess.run([sys.executable, "-m", "ofa_scale.cli.preprocess", *args, "--out", str(tmp_path / "there")],
                   check=True, env=env, capture_output=True)
    assert (tmp_path / "here" / "spm.model").read_bytes() == (tmp_path / "there" / "spm.model").read_bytes()
    meta = json.loads((tmp_path / "here" / "tokenizer.json").read_text())
    assert meta["trainer"]["sentences_seen"] == 1500 and meta["trainer"]["sentences_used"] == 700


def test_train_sentencepiece_from_python(tmp_path):
    rng = random.Random(3)
    texts = [_sentence(rng) for _ in range(3000)]
    tok = train_sentencepiece(iter(texts), tmp_path / "py", 1000, num_codes=32, num_bins=20)
    assert tok is load_tokenizer("sentencepiece", tmp_path / "py")
    assert (tok.mask, tok.code_offset, tok.bin_offset, len(tok)) == (1000, 1001, 1033, 1053)
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    with pytest.raises(ConfigError, match="num_codes"):
        load_tokenizer("sentencepiece", tmp_path / "py", num_codes=8192)
    with pytest.raises(UserError, match="no text"):
        train_sentencepiece(iter(["", "   "]), tmp_path / "empty", 300)
    with pytest.raises(UserError, match="vocab"):
        train_sentencepiece(iter(texts[:20]), tmp_path / "toobig", 5000)
    soft = train_sentencepiece(iter(texts[:20]), tmp_path / "soft", 5000, num_codes=4, num_bins=3,
                               soft_vocab_limit=True)
    assert 260 < soft.mask < 5000 and len(soft) == soft.mask + 1 + 4 + 3
    assert soft.decode(soft.encode(texts[0])) == texts[0]


def test_long_texts_are_chunked_not_dropped():
    words = [f"w{i}" for i in range(3000)]
    text = " ".join(words)
    chunks = list(_training_sentences([text]))
    assert len(chunks) > 1 and all(len(c) <= CHUNK_CHARS + 1 and c.startswith(" ") for c in chunks)
    assert " ".join(c.strip() for c in chunks).split() == words


def test_sentencepiece_user_errors(corpus, spm_dir, tmp_path, capsys):
    assert preprocess.main(["train-tokenizer", "--input", str(tmp_path / "missing.tsv"), "--vocab-size", "500",
                            "--out", str(tmp_path / "o")]) == 2
    assert "missing.tsv does not exist" in capsys.readouterr().err
    # image/detection TSVs have no text column: skipped, and with nothing else left that is an error.
    image_tsv = tmp_path / "image_examples.tsv"
    image_tsv.write_text("1\tAAAA\t1 2 3\n")
    assert preprocess.main(["train-tokenizer", "--input", str(image_tsv), "--vocab-size", "500",
                            "--out", str(tmp_path / "o")]) == 2
    assert "names no file with text" in capsys.readouterr().err
    unknown = tmp_path / "unknown.tsv"
    unknown.write_text("a\tb\tc\td\n")
    assert preprocess.main(["train-tokenizer", "--input", str(unknown), "--vocab-size", "500",
                            "--out", str(tmp_path / "o")]) == 2
    assert "prefix it with vl:, text: or lines:" in capsys.readouterr().err
    assert not (tmp_path / "o" / "tokenizer.json").exists()
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer("sentencepiece", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer("sentencepiece", tmp_path / "nothing")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "tokenizer.json").write_bytes((spm_dir / "tokenizer.json").read_bytes())
    model = bytearray((spm_dir / "spm.model").read_bytes())
    model[-1] ^= 0xFF
    (tampered / "spm.model").write_bytes(bytes(model))
    with pytest.raises(UserError, match="hash"):
        load_tokenizer("sentencepiece", tampered)
    clear_tokenizer_cache()
    assert len(load_tokenizer("sentencepiece", spm_dir)) == 700 + 1 + 8192 + 1000

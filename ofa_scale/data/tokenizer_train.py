"""`ofa-preprocess train-tokenizer`: a SentencePiece model with OFA's id layout, trained on corpus text.

For users who pretrain from scratch or on other languages (the GPT-2 BPE needs OFA's files). Text is read by OFA
format, streamed line by line, and only from the text columns: vision_language caption (col 2) and question
(col 3), text_examples text (col 1), or every line of a plain .txt file; base64 image columns are never used.

Training choices, and why:
- identity normalisation, no whitespace trimming, byte fallback: decode(encode(s)) == s for any text, as with
  GPT-2's byte-level BPE;
- no dummy prefix, but every training sentence gets one leading space: OFA encodes prompts and texts as
  " " + text, so the first word must be learnt in its word-start ('▁') form, and a leading space in the input
  then plays exactly the role GPT-2's 'Ġ' does (word starts, spec §2.4);
- lowercased by default: OFA lowercases every caption, question and infilling text before encoding;
- one thread, and our own seeded sampling of the sentences (SentencePiece's is not reproducible across
  processes), so the same input gives the same model bytes.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ofa_scale.data.tokenizer import (
    DEFAULT_NUM_BINS,
    DEFAULT_NUM_CODES,
    METADATA_FILE,
    METADATA_FORMAT_VERSION,
    SENTENCEPIECE_MODEL_FILE,
    SPECIAL_SYMBOLS,
    OFATokenizer,
    load_tokenizer,
)
from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json

# Text columns per format (spec §1): which columns hold text, and how many columns a valid row has.
TEXT_COLUMNS = {"vl": ((2, 3), 8), "text": ((1,), 2)}
FORMATS = ("vl", "text", "lines")
FORMAT_BY_NAME = {"vision_language_examples": "vl", "text_examples": "text"}
SKIPPED_BY_NAME = ("image_examples", "detection_examples")

MODEL_TYPES = ("unigram", "bpe")
# SentencePiece silently skips sentences longer than max_sentence_length bytes; we cut long texts at whitespace
# into chunks below that instead, so long documents (text_examples) still count.
MAX_SENTENCE_BYTES = 16384
CHUNK_CHARS = MAX_SENTENCE_BYTES // 4


@dataclass
class CorpusStats:
    """What was read, per file, for the metadata and the summary line."""

    files: list[dict] = field(default_factory=list)
    lines: int = 0
    texts: int = 0
    skipped_lines: int = 0


def parse_input_spec(spec: str) -> list[tuple[str, Path]]:
    """`[FORMAT:]PATH_OR_GLOB` → [(format, path)]; the format is inferred from the file name or columns.

    image_examples / detection_examples TSVs (no text column) are left out with a note, so a glob over a
    whole pretraining directory works.
    """
    fmt = None
    head, sep, rest = spec.partition(":")
    if sep and head in FORMATS:
        fmt, spec = head, rest
    paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not paths:
        raise UserError(f"--input {spec!r} matches no file; check the path or glob")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"input file {p} does not exist; check --input")
        fmt_p = fmt or _infer_format(p)
        if fmt_p is None:
            print(f"train-tokenizer: skipping {p} (image/detection TSV, no text column)", file=sys.stderr)
            continue
        out.append((fmt_p, p))
    return out


def _infer_format(path: Path) -> str | None:
    stem = path.name.split(".")[0]
    for marker, fmt in FORMAT_BY_NAME.items():
        if marker in stem:
            return fmt
    if any(marker in stem for marker in SKIPPED_BY_NAME):
        return None
    if path.suffix == ".txt":
        return "lines"
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                ncols = raw.rstrip(b"\r\n").count(b"\t") + 1
                for fmt, (_, want) in TEXT_COLUMNS.items():
                    if ncols == want:
                        return fmt
                break
    raise UserError(f"cannot tell the OFA format of {path}; prefix it with vl:, text: or lines: in --input")


def iter_corpus_text(inputs: Sequence[tuple[str, Path]], lowercase: bool = True,
                     stats: CorpusStats | None = None, progress_every_s: float = 10.0) -> Iterator[str]:
    """Yield the text fields of the inputs, streaming line by line; unreadable or malformed lines are skipped
    and counted (the converter reports them properly; here they only must not end the training)."""
    stats = stats if stats is not None else CorpusStats()
    last = time.monotonic()
    for fmt, path in inputs:
        file_stats = {"path": str(path), "format": fmt, "lines": 0, "texts": 0, "skipped_lines": 0}
        stats.files.append(file_stats)
        columns, ncols = TEXT_COLUMNS.get(fmt, ((0,), None))
        with open(path, "rb") as f:
            for raw in f:
                stats.lines += 1
                file_stats["lines"] += 1
                raw = raw.rstrip(b"\r\n")
                if fmt == "lines":
                    fields = [raw]
                else:
                    fields = raw.split(b"\t")
                    if len(fields) != ncols:
                        stats.skipped_lines += 1
                        file_stats["skipped_lines"] += 1
                        continue
                    fields = [fields[c] for c in columns]
                try:
                    texts = [x.decode("utf-8") for x in fields]
                except UnicodeDecodeError:
                    stats.skipped_lines += 1
                    file_stats["skipped_lines"] += 1
                    continue
                for text in texts:
                    text = text.strip()
                    if not text:
                        continue
                    stats.texts += 1
                    file_stats["texts"] += 1
                    yield text.lower() if lowercase else text
                if progress_every_s and time.monotonic() - last > progress_every_s:
                    last = time.monotonic()
                    print(f"train-tokenizer: {stats.lines:,} lines read, {stats.texts:,} texts", file=sys.stderr)


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """One leading space per sentence (see module doc); long texts cut at whitespace into bounded chunks."""
    for text in texts:
        text = text.strip()
        while text:
            if len(text) <= CHUNK_CHARS:
                yield " " + text
                break
            cut = text.rfind(" ", 0, CHUNK_CHARS)
            cut = CHUNK_CHARS if cut <= 0 else cut
            yield " " + text[:cut]
            text = text[cut:].lstrip()


def _reservoir_sample(items: Iterable[str], k: int, seed: int) -> tuple[int, list[str]]:
    """A uniform sample of at most `k` items of a stream (Algorithm R), reproducible for a seed; memory O(k)."""
    if k <= 0:
        raise UserError(f"--max-sentences must be positive, got {k}")
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    for n, item in enumerate(items, 1):
        if n <= k:
            sample.append(item)
        else:
            j = rng.randrange(n)
            if j < k:
                sample[j] = item
    return n, sample


def train_sentencepiece(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, *,
                        num_codes: int = DEFAULT_NUM_CODES, num_bins: int = DEFAULT_NUM_BINS,
                        model_type: str = "unigram", max_sentences: int = 2_000_000, seed: int = 0,
                        byte_fallback: bool = True, character_coverage: float = 0.9995,
                        soft_vocab_limit: bool = False,
                        corpus: dict | Callable[[], dict] | None = None) -> OFATokenizer:
    """Train a SentencePiece model on `texts` and write OUT/spm.model + OUT/tokenizer.json; return it loaded.

    `vocab_size` counts the SentencePiece model's own ids (the 4 specials, 256 byte pieces when
    `byte_fallback`, and the learnt pieces); the full vocabulary adds `<mask>`, `num_codes` codes and
    `num_bins` bins after it; with `soft_vocab_limit` a corpus too small for it gives a smaller model instead
    of an error (the layout then starts `<mask>` at the model's real size). `max_sentences` bounds what
    SentencePiece holds in memory: beyond it, a seeded uniform sample of the stream is used. `corpus` (or the dict it returns once the stream is drained) is
    recorded in the metadata.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    floor = len(SPECIAL_SYMBOLS) + (256 if byte_fallback else 0) + 1
    if vocab_size < floor:
        raise UserError(f"--vocab-size {vocab_size} is too small: it must exceed the 4 specials"
                        f"{' and 256 byte pieces' if byte_fallback else ''}; use at least {floor}")
    if num_codes < 0 or num_bins < 0:
        raise UserError(f"num_codes and num_bins must be >= 0, got {num_codes} and {num_bins}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out} ({e.strerror}); choose a writable --out") from None

    options = dict(
        vocab_size=int(vocab_size), model_type=model_type, character_coverage=float(character_coverage),
        bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        bos_piece=SPECIAL_SYMBOLS[0], pad_piece=SPECIAL_SYMBOLS[1], eos_piece=SPECIAL_SYMBOLS[2],
        unk_piece=SPECIAL_SYMBOLS[3],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=bool(byte_fallback), allow_whitespace_only_pieces=True,
        max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, hard_vocab_limit=not soft_vocab_limit, minloglevel=2,
    )
    # SentencePiece's own sampling (shuffle_input_sentence) is not reproducible across processes even with a
    # fixed seed, so we sample here (seeded reservoir) and hand it exactly the sentences to use.
    n_seen, sentences = _reservoir_sample(_training_sentences(texts), int(max_sentences), int(seed))
    if not sentences:
        raise UserError("no text to train on: the inputs hold no non-empty caption, question or text; "
                        "check --input")
    model = io.BytesIO()
    spm.set_random_generator_seed(int(seed))
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    except RuntimeError as e:
        msg = str(e).split("] ", 1)[-1].strip().rstrip(".")
        raise UserError(f"sentencepiece training failed: {msg}; lower --vocab-size, add text or pass "
                        f"--soft-vocab-limit") from None
    proto = model.getvalue()

    sp_size = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    layout = {
        "specials": list(SPECIAL_SYMBOLS), "text_pieces": [len(SPECIAL_SYMBOLS), sp_size],
        "mask": sp_size, "code_offset": sp_size + 1, "num_codes": int(num_codes),
        "bin_offset": sp_size + 1 + int(num_codes), "num_bins": int(num_bins),
        "vocab_size": sp_size + 1 + int(num_codes) + int(num_bins),
    }
    trainer = {k: v for k, v in options.items() if k not in ("minloglevel",)}
    trainer.update(seed=int(seed), max_sentences=int(max_sentences), sentences_seen=n_seen,
                   sentences_used=len(sentences), sentencepiece_version=spm.__version__)
    meta = {
        "format_version": METADATA_FORMAT_VERSION, "kind": "sentencepiece",
        "model_file": SENTENCEPIECE_MODEL_FILE, "model_sha256": hashlib.sha256(proto).hexdigest(),
        "layout": layout, "trainer": trainer, "corpus": (corpus() if callable(corpus) else corpus) or {},
    }
    # Model first, metadata last: tokenizer.json is the commit marker (it records the model's hash).
    atomic_write_bytes(out / SENTENCEPIECE_MODEL_FILE, proto)
    atomic_write_json(out / METADATA_FILE, meta)
    return load_tokenizer("sentencepiece", out)


# ------------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="[FORMAT:]PATH",
                        help="OFA TSVs (vision_language / text examples) or .txt files, globs allowed; the format "
                             "is inferred from the name or column count, or given as a vl:/text:/lines: prefix")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="SentencePiece pieces incl. the 4 specials (and 256 byte pieces); <mask>, codes "
                             "and bins are added on top")
    parser.add_argument("--out", required=True, help="output directory for spm.model and tokenizer.json")
    parser.add_argument("--num-codes", type=int, default=DEFAULT_NUM_CODES, help="image code tokens (default 8192)")
    parser.add_argument("--num-bins", type=int, default=DEFAULT_NUM_BINS, help="box bin tokens (default 1000)")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="unigram")
    parser.add_argument("--max-sentences", type=int, default=2_000_000,
                        help="sentences SentencePiece keeps in memory (a seeded sample beyond that)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--soft-vocab-limit", action="store_true",
                        help="accept fewer pieces than --vocab-size when the corpus is too small for it")
    parser.add_argument("--keep-case", action="store_true",
                        help="do not lowercase (OFA lowercases all text before encoding)")


def run(args: argparse.Namespace) -> int:
    inputs = [item for spec in args.input for item in parse_input_spec(spec)]
    if not inputs:
        raise UserError("--input names no file with text (vision_language or text examples, or .txt); "
                        "add one")
    stats = CorpusStats()
    texts = iter_corpus_text(inputs, lowercase=not args.keep_case, stats=stats)
    start = time.monotonic()
    tok = train_sentencepiece(
        texts, args.out, args.vocab_size, num_codes=args.num_codes, num_bins=args.num_bins,
        model_type=args.model_type, max_sentences=args.max_sentences, seed=args.seed,
        character_coverage=args.character_coverage, soft_vocab_limit=args.soft_vocab_limit,
        corpus=lambda: {"lowercase": not args.keep_case, **asdict(stats)})
    print(f"train-tokenizer: {args.model_type} model with {tok.mask:,} pieces from {stats.texts:,} texts "
          f"({stats.lines:,} lines, {stats.skipped_lines:,} skipped) of {len(inputs)} file(s) in "
          f"{time.monotonic() - start:.1f}s; full vocabulary {len(tok):,} ids (mask {tok.mask}, codes from "
          f"{tok.code_offset}, bins from {tok.bin_offset}) -> {args.out}")
    return 0

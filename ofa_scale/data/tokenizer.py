"""OFA's vocabulary behind one interface: GPT-2 BPE (OFA-compatible ids), a SentencePiece model of our own, or
OFA-CN's BERT WordPiece (kind "bert", ofa_scale/data/tokenizer_bert.py: its text pieces come from vocab.txt).

All tokenizers share the id layout of spec §3 / docs/interfaces.md §3:

    0..3                  <s> <pad> </s> <unk>
    4 .. mask-1           text pieces (GPT-2: the fairseq dict.txt entries, id = 4 + line index;
                          SentencePiece: the model's pieces, ids unchanged)
    mask                  <mask>
    code_offset + i       <code_i>, i < num_codes (8192)
    bin_offset + i        <bin_i>,  i < num_bins  (1000)

For the OFA files this gives mask=50264, code_offset=50265, bin_offset=58457 and 59,457 ids in all.

`encode` is plain text encoding exactly as OFA's `encode_text(use_bpe=True)`: no bos/eos, and strings such as
"<bin_3>" inside text are encoded as ordinary text (OFA never recognises them there). Region strings go through
`encode_bins`, OFA's `use_bpe=False` path. Loaded tokenizers are cached per path and pickle by path, so a
dataloader worker reloads (once per process) instead of receiving a copy of the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ofa_scale.errors import ConfigError, UserError

KINDS = ("gpt2-bpe", "sentencepiece", "bert")  # bert: OFA-CN, ofa_scale/data/tokenizer_bert.py
SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_SYMBOL = "<mask>"
DEFAULT_NUM_CODES = 8192
DEFAULT_NUM_BINS = 1000

GPT2_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
METADATA_FILE = "tokenizer.json"
SENTENCEPIECE_MODEL_FILE = "spm.model"
METADATA_FORMAT_VERSION = 1

# GPT-2's byte-to-unicode table maps the space byte to U+0120 ('Ġ'); a piece starting with it decodes to " ".
_GPT2_SPACE = "\u0120"
_SP_SPACE = "\u2581"  # SentencePiece's whitespace marker '▁'


class OFATokenizer:
    """The shared id layout, symbol table, word-start table and decoding; subclasses supply the text model."""

    kind: str = ""
    bos, pad, eos, unk = 0, 1, 2, 3

    def __init__(self, text_symbols: Sequence[str], text_word_start: np.ndarray, text_decodable: np.ndarray,
                 num_codes: int, num_bins: int, path: Path):
        if num_codes < 0 or num_bins < 0:
            raise ConfigError(f"num_codes and num_bins must be >= 0, got {num_codes} and {num_bins}")
        self.num_codes = int(num_codes)
        self.num_bins = int(num_bins)
        self.path = path
        self.mask = len(SPECIAL_SYMBOLS) + len(text_symbols)
        self.code_offset = self.mask + 1
        self.bin_offset = self.code_offset + self.num_codes
        self._size = self.bin_offset + self.num_bins

        self._symbols: list[str] = (list(SPECIAL_SYMBOLS) + list(text_symbols) + [MASK_SYMBOL]
                                    + [f"<code_{i}>" for i in range(self.num_codes)]
                                    + [f"<bin_{i}>" for i in range(self.num_bins)])
        # First occurrence wins, as in fairseq's Dictionary (a piece equal to a special name cannot shadow it).
        self._index: dict[str, int] = {}
        for i, s in enumerate(self._symbols):
            self._index.setdefault(s, i)

        # Word starts (spec §2.4): specials count as starts; a text piece iff its decoding begins with a space.
        # <mask>, codes and bins are whole units, so they count as starts too.
        table = np.ones(self._size, dtype=bool)
        table[len(SPECIAL_SYMBOLS):self.mask] = text_word_start
        table.setflags(write=False)
        self._word_start = table
        # Ids the text model can decode to characters; every other id is rendered by its symbol name.
        decodable = np.zeros(self._size, dtype=bool)
        decodable[len(SPECIAL_SYMBOLS):self.mask] = text_decodable
        self._decodable = decodable

    # ----------------------------------------------------------------------------------------------- text model
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no bos/eos (OFA prompts start with a space so the first word is a word start)."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _reload_args(self) -> tuple:
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- layout API
    def __len__(self) -> int:
        return self._size

    def code_token(self, i: int) -> int:
        """Id of `<code_i>`."""
        if not 0 <= int(i) < self.num_codes:
            raise ValueError(f"code index {i} out of range [0, {self.num_codes})")
        return self.code_offset + int(i)

    def bin_token(self, i: int) -> int:
        """Id of `<bin_i>`."""
        if not 0 <= int(i) < self.num_bins:
            raise ValueError(f"bin index {i} out of range [0, {self.num_bins})")
        return self.bin_offset + int(i)

    def is_code(self, token_id: int) -> bool:
        return self.code_offset <= int(token_id) < self.bin_offset

    def is_bin(self, token_id: int) -> bool:
        return self.bin_offset <= int(token_id) < self._size

    def code_index(self, token_id: int) -> int:
        """Inverse of `code_token`."""
        if not self.is_code(token_id):
            raise ValueError(f"token id {token_id} is not a <code_i> token")
        return int(token_id) - self.code_offset

    def bin_index(self, token_id: int) -> int:
        """Inverse of `bin_token` (OFA: bin = token - len(dict) + num_bins)."""
        if not self.is_bin(token_id):
            raise ValueError(f"token id {token_id} is not a <bin_i> token")
        return int(token_id) - self.bin_offset

    def symbol(self, token_id: int) -> str:
        """The dictionary symbol of an id (GPT-2: fairseq's symbol, i.e. the GPT-2 id as a decimal string)."""
        return self._symbols[self._check_id(token_id)]

    def index(self, symbol: str) -> int:
        """Id of a dictionary symbol; unknown symbols map to `unk`, as fairseq's Dictionary.index does."""
        return self._index.get(symbol, self.unk)

    # ------------------------------------------------------------------------------------------- word starts
    @property
    def word_start_table(self) -> np.ndarray:
        """Read-only bool array over the whole vocabulary: `table[id]` is `is_word_start(id)`."""
        return self._word_start

    def is_word_start(self, token_id: int) -> bool:
        """Spec §2.4: specials (<4) are starts; a text piece iff it decodes with a leading space ('Ġ' / '▁').

        bos/eos positions being forced to non-start is the masking code's business, not the vocabulary's.
        """
        return bool(self._word_start[self._check_id(token_id)])

    def word_start_mask(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Vectorised `is_word_start` over a sequence of ids: a bool numpy array of the same length."""
        arr = self._as_id_array(ids)
        return self._word_start[arr]

    # -------------------------------------------------------------------------------------------- conversion
    def encode_bins(self, region: str) -> list[int]:
        """OFA's `encode_text(..., use_bpe=False)`: split on whitespace and look each piece up as a symbol.

        Used for region strings such as "<bin_12> <bin_40> <bin_300> <bin_511>"; `<code_i>`, `<mask>`, the
        specials and plain dictionary symbols map directly, anything else maps to `unk` (fairseq behaviour).
        A `<bin_i>`/`<code_i>` beyond the configured count is a bug in the caller, so it raises.
        """
        out = []
        for piece in region.split():
            token_id = self._index.get(piece)
            if token_id is None:
                if piece.startswith(("<bin_", "<code_")) and piece.endswith(">"):
                    raise ValueError(f"{piece!r} is outside this tokenizer's range "
                                     f"({self.num_bins} bins, {self.num_codes} codes)")
                token_id = self.unk
            out.append(token_id)
        return out

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Runs of text pieces decode exactly (decode(encode(s)) == s); `<mask>`, `<code_i>`,
        `<bin_i>` and the specials are rendered by name, separated by one space from their neighbours
        (unless the neighbouring text already has whitespace there), so a region decodes to the string
        `encode_bins` reads back. `skip_special_tokens` drops `<s>`, `<pad>` and `</s>`.
        """
        arr = self._as_id_array(ids)
        if skip_special_tokens:
            arr = arr[(arr != self.bos) & (arr != self.pad) & (arr != self.eos)]
        if arr.size == 0:
            return ""
        text_mask = self._decodable[arr]
        if text_mask.all():
            return self._decode_text(arr.tolist())
        parts: list[tuple[bool, str]] = []  # (is_text, string)
        change = np.flatnonzero(np.diff(text_mask.astype(np.int8))) + 1
        for run in np.split(arr, change):
            if self._decodable[run[0]]:
                parts.append((True, self._decode_text(run.tolist())))
            else:
                parts.extend((False, self._symbols[i]) for i in run.tolist())
        parts = [p for p in parts if p[1] or not p[0]]
        out: list[str] = []
        for k, (is_text, s) in enumerate(parts):
            # Runs are maximal, so neighbours are never both text: every boundary touches a symbol.
            if k > 0:
                prev_text, prev = parts[k - 1]
                if not ((prev_text and prev[-1].isspace()) or (is_text and s[0].isspace())):
                    out.append(" ")
            out.append(s)
        return "".join(out)

    # ------------------------------------------------------------------------------------------------- misc
    def _check_id(self, token_id: int) -> int:
        i = int(token_id)
        if not 0 <= i < self._size:
            raise ValueError(f"token id {token_id} out of range [0, {self._size})")
        return i

    def _as_id_array(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self._size):
            bad = arr[(arr < 0) | (arr >= self._size)][0]
            raise ValueError(f"token id {int(bad)} out of range [0, {self._size})")
        return arr

    def __reduce__(self):
        # Pickle by path: workers reload through the per-process cache instead of copying the vocabulary.
        return (load_tokenizer, self._reload_args())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={str(self.path)!r}, size={self._size}, mask={self.mask}, "
                f"code_offset={self.code_offset}, bin_offset={self.bin_offset})")


class TokenizersEncoding:
    """Encoding for tokenizers whose text model is a `tokenizers.Tokenizer` (`self._tk`) built with the fairseq
    ids as its vocabulary ids (GPT-2 BPE, OFA-CN's BERT WordPiece), so its ids need no second mapping."""

    _tk: Any

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings in one call (the Rust side parallelises unless TOKENIZERS_PARALLELISM=false)."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a sequence of str")
        return [e.ids for e in self._tk.encode_batch_fast(texts, add_special_tokens=False)]


class GPT2BPETokenizer(TokenizersEncoding, OFATokenizer):
    """OFA's GPT-2 byte-level BPE, with GPT-2 ids mapped through fairseq's dict.txt (id = 4 + line index).

    The `tokenizers` BPE model is built with the fairseq ids as its vocabulary ids, so encoding needs no
    second mapping pass.
    """

    kind = "gpt2-bpe"

    def __init__(self, bpe_dir: str | os.PathLike, num_codes: int = DEFAULT_NUM_CODES,
                 num_bins: int = DEFAULT_NUM_BINS):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        bpe_dir = _existing_dir(bpe_dir, "gpt2-bpe", "encoder.json, vocab.bpe and dict.txt (OFA's utils/BPE)")
        missing = [f for f in GPT2_FILES if not (bpe_dir / f).is_file()]
        if missing:
            hint = ""
            if (bpe_dir / METADATA_FILE).is_file():
                hint = f" ({bpe_dir} holds a {METADATA_FILE}: load it with kind 'sentencepiece')"
            raise UserError(f"GPT-2 BPE directory {bpe_dir} lacks {', '.join(missing)}; pass the directory holding "
                            f"encoder.json, vocab.bpe and dict.txt (OFA's utils/BPE){hint}")
        encoder = _read_encoder(bpe_dir / "encoder.json")
        dict_symbols = _read_fairseq_dict(bpe_dir / "dict.txt")
        fairseq_id = {sym: len(SPECIAL_SYMBOLS) + i for i, sym in enumerate(dict_symbols)}
        vocab: dict[str, int] = {}
        for piece, gpt2_id in encoder.items():
            fid = fairseq_id.get(str(gpt2_id))
            if fid is None:
                raise UserError(f"{bpe_dir / 'dict.txt'} has no entry for GPT-2 id {gpt2_id} ({piece!r}) of "
                                f"encoder.json; use the dict.txt that ships with these BPE files")
            vocab[piece] = fid
        merges = _read_merges(bpe_dir / "vocab.bpe")
        try:
            tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        except Exception as e:  # the Rust side rejects merges that name pieces missing from the vocabulary
            raise UserError(f"{bpe_dir / 'vocab.bpe'} does not match encoder.json ({e}); use the files of "
                            f"one GPT-2 BPE release together") from None
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        self._tk = tk

        n_text = len(dict_symbols)
        word_start = np.zeros(n_text, dtype=bool)
        decodable = np.zeros(n_text, dtype=bool)
        for piece, fid in vocab.items():
            decodable[fid - len(SPECIAL_SYMBOLS)] = True
            word_start[fid - len(SPECIAL_SYMBOLS)] = piece.startswith(_GPT2_SPACE)
        # Dictionary entries that are not GPT-2 pieces (madeupword0000..0002) count as word starts (spec §2.4)
        # and decode by name.
        word_start |= ~decodable
        super().__init__(dict_symbols, word_start, decodable, num_codes, num_bins, bpe_dir)

    def _decode_text(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=False)

    def _reload_args(self) -> tuple:
        return ("gpt2-bpe", str(self.path), self.num_codes, self.num_bins)


class SentencePieceTokenizer(OFATokenizer):
    """A SentencePiece model trained by `train_sentencepiece` / `ofa-preprocess train-tokenizer`.

    The model itself holds ids 0..3 (the specials, trained with bos=0 pad=1 eos=2 unk=3) and its text pieces;
    `<mask>`, codes and bins are appended after it, so SentencePiece ids are used unchanged.
    """

    kind = "sentencepiece"

    def __init__(self, model_dir: str | os.PathLike, num_codes: int | None = None, num_bins: int | None = None):
        import sentencepiece as spm

        model_dir = _existing_dir(model_dir, "sentencepiece", f"{METADATA_FILE} and {SENTENCEPIECE_MODEL_FILE}")
        meta_path = model_dir / METADATA_FILE
        if not meta_path.is_file():
            hint = ""
            if all((model_dir / f).is_file() for f in GPT2_FILES):
                hint = " (it holds GPT-2 BPE files: load it with kind 'gpt2-bpe')"
            raise UserError(f"no {METADATA_FILE} in {model_dir}{hint}; train a tokenizer with `ofa-preprocess "
                            f"train-tokenizer --input TSV... --vocab-size V --out {model_dir}`")
        meta = _read_metadata(meta_path)
        model_path = model_dir / str(meta.get("model_file", SENTENCEPIECE_MODEL_FILE))
        if not model_path.is_file():
            raise UserError(f"{model_path} is missing although {meta_path} names it; retrain the tokenizer "
                            f"into {model_dir}")
        proto = model_path.read_bytes()
        if meta.get("model_sha256") and hashlib.sha256(proto).hexdigest() != meta["model_sha256"]:
            raise UserError(f"{model_path} does not match the hash recorded in {meta_path}; the directory mixes "
                            f"two trainings, retrain the tokenizer into an empty directory")
        layout = meta["layout"]
        num_codes = _agree("num_codes", num_codes, layout["num_codes"], meta_path)
        num_bins = _agree("num_bins", num_bins, layout["num_bins"], meta_path)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        specials = tuple(sp.id_to_piece(i) for i in range(min(len(SPECIAL_SYMBOLS), sp.get_piece_size())))
        if specials != SPECIAL_SYMBOLS or sp.get_piece_size() != layout["mask"]:
            raise UserError(f"{model_path} does not have the layout recorded in {meta_path} (specials {specials}, "
                            f"{sp.get_piece_size()} pieces); retrain it with `ofa-preprocess train-tokenizer`")
        self._sp = sp
        pieces = [sp.id_to_piece(i) for i in range(len(SPECIAL_SYMBOLS), sp.get_piece_size())]
        word_start = np.array([p.startswith(_SP_SPACE) for p in pieces], dtype=bool)
        decodable = np.ones(len(pieces), dtype=bool)
        self.metadata = meta
        super().__init__(pieces, word_start, decodable, num_codes, num_bins, model_dir)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a sequence of str")
        return self._sp.encode(texts, out_type=int) if texts else []

    def _decode_text(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _reload_args(self) -> tuple:
        return ("sentencepiece", str(self.path), self.num_codes, self.num_bins)


# ------------------------------------------------------------------------------------------------ loading
_CACHE: dict[tuple, OFATokenizer] = {}
_CACHE_LOCK = threading.Lock()


def load_tokenizer(kind: str, path: str | os.PathLike, num_codes: int | None = None,
                   num_bins: int | None = None) -> OFATokenizer:
    """Load (or reuse from the per-process cache) the tokenizer of `kind` stored at `path`.

    kind "gpt2-bpe": `path` holds encoder.json, vocab.bpe, dict.txt; num_codes/num_bins default to 8192/1000.
    kind "bert" (OFA-CN, spec §10.1): `path` holds BERT's vocab.txt; num_codes/num_bins as for gpt2-bpe.
    kind "sentencepiece": `path` is a `train-tokenizer` output; num_codes/num_bins come from its metadata
    (passing different values is a ConfigError). The cache key includes the files' sizes and mtimes, so a
    retrained directory is picked up.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(KINDS)}")
    resolved = Path(path).expanduser().resolve()
    if kind in ("gpt2-bpe", "bert"):
        num_codes = DEFAULT_NUM_CODES if num_codes is None else int(num_codes)
        num_bins = DEFAULT_NUM_BINS if num_bins is None else int(num_bins)
        files = GPT2_FILES if kind == "gpt2-bpe" else ("vocab.txt",)
        key = (kind, str(resolved), num_codes, num_bins, _stat_signature(resolved, files))
    else:  # the counts are fixed by the trained model's metadata; they are checked, not part of the key
        key = (kind, str(resolved), _stat_signature(resolved, (METADATA_FILE, SENTENCEPIECE_MODEL_FILE)))
    with _CACHE_LOCK:
        tok = _CACHE.get(key)
        if tok is None:
            if kind == "gpt2-bpe":
                tok = GPT2BPETokenizer(resolved, num_codes, num_bins)
            elif kind == "bert":  # OFA-CN (issue 13 §1); imported here: tokenizer_bert builds on this module
                from ofa_scale.data.tokenizer_bert import BertWordPieceTokenizer

                tok = BertWordPieceTokenizer(resolved, num_codes, num_bins)
            else:
                tok = SentencePieceTokenizer(resolved, num_codes, num_bins)
            _CACHE[key] = tok
    if kind == "sentencepiece":
        _agree("num_codes", num_codes, tok.num_codes, resolved / METADATA_FILE)
        _agree("num_bins", num_bins, tok.num_bins, resolved / METADATA_FILE)
    return tok


def clear_tokenizer_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _stat_signature(directory: Path, files: Sequence[str]) -> tuple:
    sig = []
    for name in files:
        try:
            st = (directory / name).stat()
            sig.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((name, None, None))
    return tuple(sig)


def _existing_dir(path: str | os.PathLike, kind: str, expected: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        what = "is a file" if p.exists() else "does not exist"
        raise UserError(f"{kind} tokenizer path {p} {what}; pass the directory holding {expected}")
    return p


def _read_encoder(path: Path) -> dict[str, int]:
    try:
        encoder = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); use GPT-2's encoder.json") from None
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise UserError(f"{path} is not a token -> id JSON object; use GPT-2's encoder.json")
    return encoder


def _read_fairseq_dict(path: Path) -> list[str]:
    symbols = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            sym, sep, count = line.rpartition(" ")
            if not sep or not sym:
                raise UserError(f"{path}:{n} is not a '<symbol> <count>' line; use the fairseq dict.txt of "
                                f"the GPT-2 BPE")
            symbols.append(sym)
    return symbols


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise UserError(f"{path}:{n} is not a 'left right' merge line; use GPT-2's vocab.bpe")
            merges.append((parts[0], parts[1]))
    return merges


def _read_metadata(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); retrain the tokenizer") from None
    if not isinstance(meta, dict) or meta.get("kind") != "sentencepiece":
        raise UserError(f"{path} does not describe a sentencepiece tokenizer; retrain it with "
                        f"`ofa-preprocess train-tokenizer`")
    if meta.get("format_version") != METADATA_FORMAT_VERSION:
        raise UserError(f"{path} has format_version {meta.get('format_version')!r}, this ofa-scale reads "
                        f"{METADATA_FORMAT_VERSION}; retrain the tokenizer with this version")
    layout = meta.get("layout")
    if not isinstance(layout, dict) or not all(k in layout for k in ("mask", "num_codes", "num_bins")):
        raise UserError(f"{path} has no valid 'layout'; retrain the tokenizer")
    return meta


def _agree(name: str, requested: int | None, recorded: int, meta_path: Path) -> int:
    if requested is not None and int(requested) != int(recorded):
        raise ConfigError(f"{name}={requested} was requested but the tokenizer in {meta_path.parent} was trained "
                          f"with {name}={recorded}; drop the override or retrain with --{name.replace('_', '-')}")
    return int(recorded)


def train_sentencepiece(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, **kwargs) -> OFATokenizer:
    """Train a SentencePiece tokenizer with OFA's layout; see `ofa_scale.data.tokenizer_train`."""
    from ofa_scale.data.tokenizer_train import train_sentencepiece as _train

    return _train(texts, out_dir, vocab_size, **kwargs)

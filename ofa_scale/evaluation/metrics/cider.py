"""CIDEr-D (n = 4, sigma = 6, ×10) with cached document frequencies: OFA's `utils/cider` CiderD, kept by hand only
where pycocoevalcap cannot serve — the SCST reward and validation against frequencies cached from a reference
corpus (`coco-train-words.p` in OFA; `ofa-eval cider-df` here). pycocoevalcap's `Cider` is the same CIDEr-D
(clipped TF-IDF cosine, Gaussian length penalty, ×10) but always takes the frequencies from the references it is
handed, so the final COCO metrics use it directly (`metrics/caption.py`) and the tests check this class equal to
it when the cache is built from those same references.

Each sentence becomes, per n-gram order, a TF-IDF vector with idf = log(num_documents) − log(max(1, df)). A
hypothesis scores, per reference, the clipped cosine (min(hyp, ref) · ref / (|hyp| |ref|)) damped by a Gaussian
of the length difference; the score is the mean over orders and references, times 10. A document is the set of
references of one image.

SCST (spec §6.2): `CiderD(df).score_scst(hyps, refs_per_hyp)` puts every sentence in OFA's reward form
(`scst_sentence`: punctuation removed, ` <eos>` appended) and returns one CIDEr-D per hypothesis.
"""

from __future__ import annotations

import gzip
import math
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.caption_text import SCST_END_TOKEN, scst_sentence
from ofa_scale.utils.io import atomic_write_bytes

DF_FORMAT_VERSION = 2
DF_KIND = "cider-document-frequencies"

# An n-gram is its words joined by single spaces (lossless: words are whitespace-split). Strings rather than
# tuples let a cache load with no per-entry conversion.
NGram = str


def ngram_counts(words: Sequence[str], max_n: int) -> list[Counter[NGram]]:
    """Per order 1..max_n, the counts of its n-grams of `words`, inserted left to right (the order pycocoevalcap
    sums in, so floating-point sums match it bit for bit)."""
    return [Counter(" ".join(words[i:i + k]) for i in range(len(words) - k + 1)) for k in range(1, max_n + 1)]


@dataclass(frozen=True)
class DocumentFrequencies:
    counts: Mapping[NGram, float]  # n-gram -> number of documents (reference sets) containing it
    num_documents: int
    n: int = 4

    @property
    def log_num_documents(self) -> float:
        return math.log(float(self.num_documents))

    @classmethod
    def from_references(cls, references: Sequence[Sequence[str]], n: int = 4) -> "DocumentFrequencies":
        """One document per entry of `references` (the space-tokenised references of one image)."""
        counts: Counter[NGram] = Counter()
        for refs in references:
            seen: set[NGram] = set()
            for ref in refs:
                for order in ngram_counts(ref.split(), n):
                    seen.update(order)
            counts.update(seen)
        return cls(counts=dict(counts), num_documents=len(references), n=n)

    def save(self, path: str | Path) -> None:
        """Versioned JSON, gzip-compressed when the name ends in .gz, written atomically (temporary file +
        rename). The n-grams are one newline-joined string and the counts one integer list, which load about 2×
        faster than format 1's JSON object of n-grams (`benchmarks/cider_df_load.py`)."""
        import json

        payload = {"format_version": DF_FORMAT_VERSION, "kind": DF_KIND, "n": self.n,
                   "num_documents": self.num_documents, "ngrams": "\n".join(self.counts),
                   "counts": [int(c) for c in self.counts.values()]}
        data = (json.dumps(payload, separators=(",", ":")) + "\n").encode("utf-8")
        atomic_write_bytes(path, gzip.compress(data, compresslevel=6, mtime=0) if str(path).endswith(".gz")
                           else data)

    @classmethod
    def load(cls, path: str | Path) -> "DocumentFrequencies":
        """Our JSON cache (`save`; version 1, a JSON object of n-grams, is still read), or OFA's/ruotianluo's
        pickle (`coco-train-words.p`: document_frequency + ref_len), read without executing pickled code."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"CIDEr document-frequency cache {path} does not exist; build one with "
                            "`ofa-eval cider-df --tsv TRAIN.tsv --out DF.json.gz`")
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        if raw[:1] == b"\x80":
            return _load_ofa_pickle(raw, path)
        import json

        try:
            payload = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{path} is neither a JSON document-frequency cache nor an OFA pickle ({e}); "
                            "rebuild it with `ofa-eval cider-df`") from None
        if (not isinstance(payload, dict) or payload.get("kind") != DF_KIND
                or payload.get("format_version") not in (1, DF_FORMAT_VERSION)):
            raise UserError(f"{path} is not a {DF_KIND} file of format version 1 or {DF_FORMAT_VERSION}; rebuild "
                            "it with `ofa-eval cider-df`")
        if payload["format_version"] == 1:
            counts = dict(payload["document_frequency"])
        else:
            ngrams = payload["ngrams"].split("\n") if payload["ngrams"] else []
            if len(ngrams) != len(payload["counts"]):
                raise UserError(f"{path} holds {len(ngrams)} n-grams but {len(payload['counts'])} counts; "
                                "rebuild it with `ofa-eval cider-df`")
            counts = dict(zip(ngrams, payload["counts"]))
        return cls(counts=counts, num_documents=int(payload["num_documents"]), n=int(payload["n"]))


class _PlainDataUnpickler(pickle.Unpickler):
    """Allows only the containers a df pickle holds; any other global (code) is refused."""

    _ALLOWED = {("collections", "defaultdict")} | {
        (module, name) for module in ("builtins", "__builtin__") for name in ("float", "int", "dict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _load_ofa_pickle(raw: bytes, path: Path) -> DocumentFrequencies:
    import io

    try:
        payload = _PlainDataUnpickler(io.BytesIO(raw), encoding="latin1").load()
        counts = {" ".join(str(w) for w in g): float(c) for g, c in payload["document_frequency"].items()}
        num_documents = int(payload["ref_len"])  # stored as a count; the scorer takes its log
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise UserError(f"{path} is not a CIDEr df pickle with document_frequency and ref_len ({e}); "
                        "rebuild it with `ofa-eval cider-df`") from None
    n = max((g.count(" ") + 1 for g in counts), default=4)
    return DocumentFrequencies(counts=counts, num_documents=num_documents, n=n)


class _Vector:
    """Per-order TF-IDF weights of one sentence, their norms, and the length used by the Gaussian penalty."""

    __slots__ = ("weights", "norms", "length")

    def __init__(self, sentence: str, df: Mapping[NGram, float], log_docs: float, n: int):
        self.weights: list[dict[NGram, float]] = [{} for _ in range(n)]
        squares = [0.0] * n
        self.length = 0
        per_order = ngram_counts(sentence.split(), n)
        for order, counts in enumerate(per_order):
            weights = self.weights[order]
            for gram, tf in counts.items():
                w = float(tf) * (log_docs - math.log(max(1.0, df.get(gram, 0.0))))
                weights[gram] = w
                squares[order] += w * w
        # The reference implementations take the bigram count as the length (an off-by-one kept for identical
        # scores).
        self.length = sum(per_order[1].values()) if n > 1 else 0
        self.norms = [math.sqrt(s) for s in squares]


class CiderD:
    """Per-hypothesis CIDEr-D. `df`: a DocumentFrequencies, the path of a cache (`ofa-eval cider-df` output or
    OFA's `*-words.p`), or None to take the frequencies from the references being scored (pycocoevalcap's
    corpus mode). Build it once: the cache is read at construction."""

    def __init__(self, df: DocumentFrequencies | str | Path | None = None, n: int = 4, sigma: float = 6.0):
        if isinstance(df, (str, Path)):
            df = DocumentFrequencies.load(df)
        if df is not None and df.num_documents < 1:
            raise UserError("the CIDEr document-frequency cache was built from zero documents; rebuild it")
        self.df = df
        self.n = n
        self.sigma = sigma

    def _similarity(self, hyp: _Vector, ref: _Vector) -> float:
        penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for order in range(self.n):
            ref_w = ref.weights[order]
            value = 0.0
            for gram, w in hyp.weights[order].items():
                r = ref_w.get(gram, 0.0)
                value += min(w, r) * r
            if hyp.norms[order] != 0 and ref.norms[order] != 0:
                value /= hyp.norms[order] * ref.norms[order]
            total += value * penalty
        return total / self.n

    def score_per_hypothesis(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of `hypotheses[i]` (space-tokenised) against `references[i]`, as a float64 array. Text is used
        as given: prepare it first (`prepare_caption`, or `score_scst`)."""
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
        if not hypotheses:
            return np.zeros(0)
        df = self.df if self.df is not None else DocumentFrequencies.from_references(references, self.n)
        counts, log_docs = df.counts, df.log_num_documents
        ref_cache: dict[str, _Vector] = {}  # SCST scores 5 hypotheses against the same references
        scores = np.zeros(len(hypotheses))
        for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
            if not refs:
                raise ValueError(f"hypothesis {i} has no references")
            hyp_vec = _Vector(hyp, counts, log_docs, self.n)
            total = 0.0
            for ref in refs:
                ref_vec = ref_cache.get(ref)
                if ref_vec is None:
                    ref_vec = ref_cache[ref] = _Vector(ref, counts, log_docs, self.n)
                total += self._similarity(hyp_vec, ref_vec)
            scores[i] = total / len(refs) * 10.0
        return scores

    def score_scst(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """OFA's SCST reward input (spec §6.2 steps 2-3): decoded hypotheses and raw reference captions (one list
        per hypothesis, e.g. an image's references repeated for each of its beams) put in `scst_sentence` form,
        then CIDEr-D per hypothesis. The baseline and the ×reward weight are the caller's."""
        if self.df is not None and self.df.counts and SCST_END_TOKEN not in self.df.counts:
            raise UserError(f"the CIDEr document-frequency cache has no '{SCST_END_TOKEN}' n-grams, so it was not "
                            f"built from SCST-form sentences; rebuild it with `ofa-eval cider-df`")
        return self.score_per_hypothesis([scst_sentence(h) for h in hypotheses],
                                         [[scst_sentence(r) for r in refs] for refs in references])

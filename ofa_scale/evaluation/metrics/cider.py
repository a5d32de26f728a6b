"""CIDEr-D (n = 4, sigma = 6, ×10), as pycocoevalcap's `Cider` and OFA's `utils/cider` CiderD compute it.

Each sentence becomes, per n-gram order, a TF-IDF vector with idf = log(num_documents) − log(max(1, df)). A
hypothesis scores, per reference, the clipped cosine (min(hyp, ref) · ref / (|hyp| |ref|)) damped by a Gaussian
of the length difference; the score is the mean over orders and references, times 10.

Document frequencies come either from the references being scored ("corpus" mode: one document per
hypothesis entry, df = number of entries whose references contain the n-gram) or from a cache built once from a
reference corpus — the SCST reward scores every beam hypothesis against train-set statistics this way
(`CiderD(df).score(hyps, refs_per_hyp)`).
"""

from __future__ import annotations

import gzip
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.ngrams import NGram, ngram_counts
from ofa_scale.utils.io import atomic_write_bytes

DF_FORMAT_VERSION = 1
DF_KIND = "cider-document-frequencies"


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
        counts: dict[NGram, float] = {}
        for refs in references:
            seen: set[NGram] = set()
            for ref in refs:
                seen.update(ngram_counts(ref.split(), n))
            for gram in seen:
                counts[gram] = counts.get(gram, 0.0) + 1.0
        return cls(counts=counts, num_documents=len(references), n=n)

    def save(self, path: str | Path) -> None:
        """JSON (gzip-compressed when the name ends in .gz); n-grams are stored space-joined, which is lossless
        because tokens never contain whitespace."""
        import json

        payload = {"format_version": DF_FORMAT_VERSION, "kind": DF_KIND, "n": self.n,
                   "num_documents": self.num_documents,
                   "document_frequency": {" ".join(g): c for g, c in self.counts.items()}}
        data = (json.dumps(payload, separators=(",", ":")) + "\n").encode("utf-8")
        atomic_write_bytes(path, gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)

    @classmethod
    def load(cls, path: str | Path) -> "DocumentFrequencies":
        """Our JSON cache (`save`), or OFA's/ruotianluo's pickle (`coco-train-words.p`: document_frequency +
        ref_len), read without executing pickled code."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"CIDEr document-frequency cache {path} does not exist; build one with "
                            "`ofa-eval cider-df --references R.jsonl --out DF.json.gz`")
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
        if payload.get("kind") != DF_KIND or payload.get("format_version") != DF_FORMAT_VERSION:
            raise UserError(f"{path} is not a version-{DF_FORMAT_VERSION} {DF_KIND} file; rebuild it with "
                            "`ofa-eval cider-df`")
        counts = {tuple(k.split(" ")): float(v) for k, v in payload["document_frequency"].items()}
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
        counts = {tuple(str(w) for w in g): float(c) for g, c in payload["document_frequency"].items()}
        num_documents = int(payload["ref_len"])  # stored as a count; the scorer takes its log
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise UserError(f"{path} is not a CIDEr df pickle with document_frequency and ref_len ({e}); "
                        "rebuild it with `ofa-eval cider-df`") from None
    n = max((len(g) for g in counts), default=4)
    return DocumentFrequencies(counts=counts, num_documents=num_documents, n=n)


class _Vector:
    """Per-order TF-IDF weights of one sentence, their norms, and the length used by the Gaussian penalty."""

    __slots__ = ("weights", "norms", "length")

    def __init__(self, sentence: str, df: Mapping[NGram, float], log_docs: float, n: int):
        self.weights: list[dict[NGram, float]] = [{} for _ in range(n)]
        squares = [0.0] * n
        self.length = 0
        for gram, tf in ngram_counts(sentence.split(), n).items():
            order = len(gram) - 1
            w = float(tf) * (log_docs - math.log(max(1.0, df.get(gram, 0.0))))
            self.weights[order][gram] = w
            squares[order] += w * w
            if order == 1:
                # The reference implementations count bigrams here (an off-by-one kept for identical scores).
                self.length += tf
        self.norms = [math.sqrt(s) for s in squares]


class CiderD:
    """`CiderD(df).score(hyps, refs_per_hyp)` -> per-hypothesis CIDEr-D. With `df=None`, frequencies are
    computed from `refs_per_hyp` itself (pycocoevalcap's corpus mode)."""

    def __init__(self, df: DocumentFrequencies | None = None, n: int = 4, sigma: float = 6.0):
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

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
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

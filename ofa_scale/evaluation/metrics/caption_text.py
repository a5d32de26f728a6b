"""Caption text preparation before scoring (spec §6.2, §7.1).

Two tokenisations, both yielding lower-case words joined by single spaces:

* `ofa` — OFA's training-time CIDEr path: delete every ASCII punctuation character, collapse whitespace.
  OFA expects lower-case data and does not lower-case; we do, which changes nothing on such data and keeps
  mixed-case references from silently scoring zero.
* `ptb` — the final COCO protocol (pycocoevalcap's `PTBTokenizer`): Stanford CoreNLP's PTBTokenizer with
  `-preserveLines -lowerCase`, then pycocoevalcap's punctuation tokens dropped. Needs Java and the CoreNLP jar
  that ships inside the pycocoevalcap wheel. We run the library's jar with the library's command and
  punctuation list, but not its `PTBTokenizer` class: that writes its temporary file next to the jar, inside
  site-packages, which fails on a read-only install (a cluster container image); the test suite checks the
  output equal to `PTBTokenizer`'s.
"""

from __future__ import annotations

import re
import shutil
import string
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from ofa_scale.errors import UserError

CAPTION_TOKENIZERS = ("ofa", "ptb")
REFERENCE_SEPARATOR = "&&"
SCST_END_TOKEN = "<eos>"

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


def strip_punctuation(text: str) -> str:
    return text.translate(_PUNCTUATION_TABLE)


def prepare_caption(text: str) -> str:
    """`ofa` tokenisation of one caption: lower-case, punctuation deleted, single spaces."""
    return " ".join(strip_punctuation(text.lower()).split())


def scst_sentence(text: str) -> str:
    """A caption as OFA's SCST reward sees it: prepared, then ` <eos>` appended, to match n-gram document
    frequencies cached from sentences written that way (spec §6.2 step 2)."""
    return f"{prepare_caption(text)} {SCST_END_TOKEN}".lstrip()


def split_references(value: str | Sequence[str]) -> list[str]:
    """References given as a list, or as one `&&`-joined string (OFA's stage-2/test TSV field)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(REFERENCE_SEPARATOR)]
    return [str(v) for v in value]


def _ptb_library():
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise UserError("the ptb caption tokenizer needs pycocoevalcap (pip install pycocoevalcap); "
                        "or use --caption-tokenizer ofa") from None
    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    if not jar.is_file():
        raise UserError(f"{jar} is missing; reinstall pycocoevalcap or use --caption-tokenizer ofa")
    return jar, frozenset(ptbtokenizer.PUNCTUATIONS)


def java_executable() -> str:
    java = shutil.which("java")
    if java is None:
        raise UserError("PTB tokenisation and METEOR run Java, which is not on PATH; install a JRE (>= 8) "
                        "or use --caption-tokenizer ofa without --meteor")
    return java


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTB tokenisation of each sentence (one Java process for the whole list)."""
    if not sentences:
        return []
    (jar, punctuation), java = _ptb_library(), java_executable()
    # One sentence per line: newlines inside a caption would shift every later line.
    text = "\n".join(_WHITESPACE.sub(" ", s).strip() for s in sentences)
    with tempfile.TemporaryDirectory(prefix="ofa-ptb-") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_text(text, encoding="utf-8")
        proc = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(src)], capture_output=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"the Java PTB tokenizer failed ({proc.stderr.decode(errors='replace').strip()[:200]}); "
                        "check the Java install or use --caption-tokenizer ofa")
    lines = proc.stdout.decode("utf-8").split("\n")
    out = []
    for i in range(len(sentences)):
        line = lines[i] if i < len(lines) else ""
        out.append(" ".join(w for w in line.rstrip().split(" ") if w and w not in punctuation))
    return out


def tokenize_captions(sentences: Sequence[str], tokenizer: str) -> list[str]:
    if tokenizer == "ofa":
        return [prepare_caption(s) for s in sentences]
    if tokenizer == "ptb":
        return ptb_tokenize(sentences)
    raise UserError(f"unknown caption tokenizer {tokenizer!r}; use one of {', '.join(CAPTION_TOKENIZERS)}")

"""The row schemas of every OFA TSV format, as a table of column parsers.

A format says how many columns a row has, which column is the id and which holds the base64 image, and which
parser turns each other column into a typed JSON field. A parser raises `RowReject(code, detail)` for bad input;
the converter turns that into a line of rejects.tsv. Adding a format is a few lines in `FORMATS`.

Pretraining formats follow spec §1, fine-tuning formats spec §7 (column order as in each task's README TSV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ofa_scale.errors import UserError


class RowReject(Exception):
    """A row that cannot be converted. `code` is a stable machine-readable reason; `detail` is for humans."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(code)
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


# Reject codes (the `reason` column of rejects.tsv starts with one of these).
BLANK_LINE = "blank_line"
BAD_UTF8 = "bad_utf8"
WRONG_COLUMN_COUNT = "wrong_column_count"
EMPTY_TEXT = "empty_text"
BAD_TYPE = "bad_type"
BAD_ANSWERS = "bad_answers"
BAD_LABEL = "bad_label"
BAD_CODES = "bad_codes"
BAD_OBJECT = "bad_object"
BOX_NOT_NUMERIC = "box_not_numeric"
BOX_NOT_FINITE = "box_not_finite"
BOX_DEGENERATE = "box_degenerate"
BOX_OUTSIDE_IMAGE = "box_outside_image"
BAD_BASE64 = "bad_base64"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED_IMAGE = "truncated_image"
IMAGE_TOO_LARGE = "image_too_large"
WRONG_IMAGE_SIZE = "wrong_image_size"
MISSING_IMAGE = "missing_image"

NUM_CODES = 8192
# Boxes may overshoot the image by rounding; within this many pixels they are clipped, beyond it rejected.
BOX_TOLERANCE_PX = 1.0


# ----------------------------------------------------------------------------------------------- parsers
def text(s: str) -> str:
    return s


def required_text(s: str) -> str:
    if not s.strip():
        raise RowReject(EMPTY_TEXT)
    return s


def amp_list(s: str) -> list[str]:
    """`a&&b&&` -> ["a", "b"] (empties dropped, items verbatim)."""
    return [x for x in s.split("&&") if x]


def object_list(s: str) -> list[str]:
    """OFA's `gt_objects.strip().split('&&')`: the column is stripped, so the first entry loses its leading and the
    last its trailing whitespace; spaces next to `&&` inside stay, as in OFA (an entry is replaced verbatim in the
    caption to build an ITM negative). Blank entries are dropped: OFA would replace '' (or ' ') in the caption,
    i.e. insert the negative object between every character (or at every space)."""
    return [x for x in s.strip().split("&&") if x.strip()]


def box(s: str) -> list[float]:
    """`x0,y0,x1,y1` -> four floats; checked here for shape, later against the image size."""
    parts = s.split(",")
    if len(parts) != 4:
        raise RowReject(BOX_NOT_NUMERIC, f"expected 4 comma-separated numbers, got {len(parts)}")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise RowReject(BOX_NOT_NUMERIC, repr(s[:60])) from None
    return _checked_box(vals)


def _checked_box(vals: list[float]) -> list[float]:
    if not all(math.isfinite(v) for v in vals):
        raise RowReject(BOX_NOT_FINITE, ",".join(map(str, vals)))
    if vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise RowReject(BOX_DEGENERATE, ",".join(f"{v:g}" for v in vals))
    return vals


def qa_answers(s: str) -> list[dict[str, Any]]:
    """`0.6|!+no&&1.0|!+yes` -> [{"answer": "no", "conf": 0.6}, {"answer": "yes", "conf": 1.0}] (file order)."""
    out = []
    for item in amp_list(s):
        conf_s, sep, answer = item.partition("|!+")
        if not sep:
            raise RowReject(BAD_ANSWERS, f"item {item[:40]!r} lacks the '|!+' separator")
        try:
            conf = float(conf_s)
        except ValueError:
            raise RowReject(BAD_ANSWERS, f"confidence {conf_s[:20]!r} is not a number") from None
        if not math.isfinite(conf) or not answer.strip():
            raise RowReject(BAD_ANSWERS, f"item {item[:40]!r} has a non-finite confidence or empty answer")
        out.append({"answer": answer, "conf": conf})
    if not out:
        raise RowReject(BAD_ANSWERS, "no answers")
    return out


def codes(n: int) -> Callable[[str], list[int]]:
    def parse(s: str) -> list[int]:
        parts = s.split()
        if len(parts) != n:
            raise RowReject(BAD_CODES, f"expected {n} codes, got {len(parts)}")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise RowReject(BAD_CODES, "codes must be integers") from None
        bad = [v for v in vals if not 0 <= v < NUM_CODES]
        if bad:
            raise RowReject(BAD_CODES, f"code {bad[0]} outside [0, {NUM_CODES - 1}]")
        return vals

    return parse


def square_codes(s: str) -> list[int]:
    """A square grid of codes: image_gen's 32x32 = 1024 of OFA's 256-px code images, or a smaller grid
    (task.extra.code_image_size, finetune/image_gen.py)."""
    vals = codes(len(s.split()))(s)
    side = math.isqrt(len(vals))
    if side < 1 or side * side != len(vals):
        raise RowReject(BAD_CODES, f"{len(vals)} codes do not fill a square grid (OFA: 1024 = 32x32)")
    return vals


def detection_objects(s: str) -> list[dict[str, Any]]:
    """`x0,y0,x1,y1,cat_id,cat_name&&…`; split on the first 5 commas only (names may contain commas).
    As OFA's `process_detection`: the column and then each object are stripped before the split, so a category
    name loses trailing whitespace (and keeps leading whitespace after its comma, which OFA also encodes)."""
    objs = []
    for item in object_list(s):
        parts = item.strip().split(",", 5)
        if len(parts) != 6:
            raise RowReject(BAD_OBJECT, f"object {item[:60]!r} needs x0,y0,x1,y1,cat_id,cat_name")
        if not parts[5].strip():
            raise RowReject(BAD_OBJECT, f"object {item[:60]!r} has an empty category name")
        objs.append({"box": box(",".join(parts[:4])), "cat_id": parts[4], "cat_name": parts[5]})
    if not objs:
        raise RowReject(EMPTY_TEXT, "no objects")
    return objs


def label(mapping: dict[str, str]) -> Callable[[str], str]:
    """A class label column -> the answer word OFA trains on (e.g. entailment -> yes)."""

    def parse(s: str) -> str:
        key = s.strip()
        if key not in mapping:
            raise RowReject(BAD_LABEL, f"{key[:30]!r} is not one of {', '.join(mapping)}")
        return mapping[key]

    return parse


def integer(s: str) -> int:
    try:
        return int(s.strip())
    except ValueError:
        raise RowReject(BAD_LABEL, f"{s[:30]!r} is not an integer") from None


# ----------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Column:
    index: int
    name: str
    parse: Callable[[str], Any] = text


@dataclass(frozen=True)
class RowFormat:
    name: str
    n_columns: int
    columns: tuple[Column, ...]
    id_column: int | None = 0  # None: no id column, the line number is the id
    image_column: int | None = None
    exact_columns: bool = True  # False: at least n_columns (raw GLUE files carry extra columns)
    image_size: tuple[int, int] | None = None  # required stored size, e.g. (256, 256) for image_examples
    downscalable: bool = True  # False where pixels are tied to other columns (VQ codes)
    # Cross-column validation and derived fields; may raise RowReject.
    finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    description: str = ""

    def parse(self, cols: list[str], line_number: int) -> tuple[str, dict[str, Any]]:
        """(uniq_id, typed fields) for a row already split on tabs; the image column is left to the caller."""
        if len(cols) != self.n_columns and (self.exact_columns or len(cols) < self.n_columns):
            want = self.n_columns if self.exact_columns else f"at least {self.n_columns}"
            raise RowReject(WRONG_COLUMN_COUNT, f"expected {want}, got {len(cols)}")
        uniq_id = cols[self.id_column] if self.id_column is not None else str(line_number)
        fields = {}
        for c in self.columns:
            try:
                fields[c.name] = c.parse(cols[c.index])
            except RowReject as e:
                if not e.detail:
                    e.detail = c.name
                raise
        if self.finish is not None:
            fields = self.finish(fields)
        return uniq_id, fields


def iter_boxes(fields: Any) -> Iterator[list[float]]:
    """Every box in a record (a `box` key holding a list), so validation and rescaling are format-agnostic."""
    if isinstance(fields, dict):
        for k, v in fields.items():
            if k == "box" and isinstance(v, list):
                yield v
            else:
                yield from iter_boxes(v)
    elif isinstance(fields, list):
        for v in fields:
            yield from iter_boxes(v)


def _finish_vl(f: dict[str, Any]) -> dict[str, Any]:
    """Spec §1.1: what `refs` means depends on `type`."""
    vtype, refs = f.pop("type"), f.pop("refs")
    out = {"type": vtype, "caption": f["caption"], "question": f["question"], "answers": [], "box": None,
           "gt_objects": f["gt_objects"], "dataset_name": f["dataset_name"]}
    if vtype == "caption":
        if not out["caption"].strip():
            raise RowReject(EMPTY_TEXT, "caption")
    elif vtype == "qa":
        if not out["question"].strip():
            raise RowReject(EMPTY_TEXT, "question")
        out["answers"] = qa_answers(refs)
    elif vtype == "visual_grounding":
        if not out["caption"].strip():
            raise RowReject(EMPTY_TEXT, "caption")
        out["box"] = box(refs)
    else:
        raise RowReject(BAD_TYPE, f"{vtype[:30]!r} is not caption, qa or visual_grounding")
    return out


def _finish_caption(f: dict[str, Any]) -> dict[str, Any]:
    f["captions"] = amp_list(f["caption"])  # stage-2/val/test rows list every reference caption
    return f


def _glue(name: str, n: int, cols: list[tuple[int, str]], labels: dict[str, str], desc: str) -> RowFormat:
    columns = tuple(Column(i, nm, required_text) for i, nm in cols[:-1]) + (Column(cols[-1][0], "label",
                                                                                    label(labels)),)
    return RowFormat(name, n, columns, id_column=None, exact_columns=False, description=desc)


_YES_NO = {"0": "no", "1": "yes"}

FORMATS: dict[str, RowFormat] = {f.name: f for f in (
    # ---- pretraining (spec §1)
    RowFormat("vl", 8, (Column(2, "caption"), Column(3, "question"), Column(4, "refs"),
                        Column(5, "gt_objects", object_list), Column(6, "dataset_name"), Column(7, "type")),
              image_column=1, finish=_finish_vl, description="vision_language_examples.tsv (spec §1.1)"),
    RowFormat("text", 2, (Column(1, "text", required_text),), description="text_examples.tsv (spec §1.2)"),
    RowFormat("image", 3, (Column(2, "codes", codes(256)),), image_column=1, image_size=(256, 256),
              downscalable=False, description="image_examples.tsv (spec §1.3)"),
    RowFormat("detection", 3, (Column(2, "objects", detection_objects),), image_column=1,
              description="detection_examples.tsv (spec §1.4)"),
    # ---- fine-tuning (spec §7)
    RowFormat("caption", 5, (Column(1, "image_id"), Column(2, "caption", required_text),
                             Column(3, "objects", amp_list)),
              image_column=4, finish=_finish_caption, description="COCO caption (spec §7.1)"),
    RowFormat("vqa", 6, (Column(1, "image_id"), Column(2, "question", required_text),
                         Column(3, "answers", qa_answers), Column(4, "objects", amp_list)),
              image_column=5, description="VQA v2 vqa_gen (spec §7.2)"),
    RowFormat("refcoco", 5, (Column(1, "image_id"), Column(2, "text", required_text), Column(3, "box", box)),
              image_column=4, description="RefCOCO/+/g visual grounding (spec §7.3)"),
    RowFormat("snli_ve", 6, (Column(1, "image_id"), Column(3, "hypothesis", required_text),
                             Column(4, "caption"),
                             Column(5, "label", label({"entailment": "yes", "contradiction": "no",
                                                       "neutral": "maybe"}))),
              image_column=2, description="SNLI-VE (spec §7.4); label stored as its answer word"),
    RowFormat("ocr", 3, (Column(2, "text", required_text),), image_column=1,
              description="OFA-OCR text recognition (spec §10.2.1): uniq-id, image, text"),
    RowFormat("imagenet", 3, (Column(1, "label_index", integer), Column(2, "class_name", required_text)),
              id_column=None, image_column=0, description="ImageNet-1K (spec §7.5)"),
    RowFormat("image_gen", 3, (Column(1, "codes", square_codes), Column(2, "caption", required_text)),
              description="text-to-image (spec §7.6): 1024 codes of a 256x256 image (or a smaller square grid), "
                          "no image column"),
    RowFormat("gigaword", 2, (Column(0, "source", required_text), Column(1, "target", required_text)),
              id_column=None, description="Gigaword summarisation (spec §7.7)"),
    _glue("glue_cola", 3, [(1, "sentence"), (2, "label")], _YES_NO, "CoLA (spec §7.8, cols 1,2)"),
    _glue("glue_sst2", 2, [(0, "sentence"), (1, "label")], {"0": "negative", "1": "positive"},
          "SST-2 (spec §7.8, cols 0,1)"),
    _glue("glue_mrpc", 3, [(0, "sentence1"), (1, "sentence2"), (2, "label")], _YES_NO, "MRPC (cols 0,1,2)"),
    _glue("glue_qqp", 6, [(3, "question1"), (4, "question2"), (5, "label")], _YES_NO, "QQP (cols 3,4,5)"),
    _glue("glue_mnli", 3, [(0, "sentence1"), (1, "sentence2"), (2, "label")],
          {"0": "maybe", "1": "yes", "2": "no"}, "MNLI (cols 0,1,2)"),
    _glue("glue_rte", 4, [(1, "sentence1"), (2, "sentence2"), (3, "label")],
          {"not_entailment": "no", "entailment": "yes"}, "RTE (cols 1,2,3)"),
    _glue("glue_qnli", 4, [(1, "question"), (2, "sentence"), (3, "label")],
          {"0": "no", "1": "yes", "not_entailment": "no", "entailment": "yes"}, "QNLI (cols 1,2,3)"),
)}

PRETRAIN_SOURCES = ("vl", "text", "image", "detection")


def get_format(name: str) -> RowFormat:
    if name not in FORMATS:
        raise UserError(f"unknown TSV format {name!r}; use one of: {', '.join(FORMATS)}.")
    return FORMATS[name]

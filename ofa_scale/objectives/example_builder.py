"""`ExampleBuilder`: the callable a DataLoader worker applies to each raw record (docs/interfaces.md §2 → §4).

It is picklable and cheap to send to workers: the tokenizer and the negative-sample files are loaded lazily,
once per process, on the first record.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.objectives.builders import (BuildContext, Example, detection_example, image_infill_example,
                                           text_infill_example, vl_row_examples)
from ofa_scale.objectives.config import ObjectivesConfig
from ofa_scale.objectives.negatives import Negatives


class ExampleBuilder:
    """`builder(record) -> list[example]`, dispatching on `record["source"]` (vl, text, image, detection).

    Either name the tokenizer (`tokenizer_kind`, `tokenizer_dir`) so each worker loads it, or pass a loaded
    `tokenizer` (tests; OFA tokenizers pickle by path, so this stays cheap too). Negatives are read from
    `negatives_dir` (the shards' `negatives/` folder) when the itm task is enabled.
    """

    def __init__(self, cfg: ObjectivesConfig, tokenizer_kind: str = "gpt2-bpe",
                 tokenizer_dir: Optional[str | os.PathLike] = None, negatives_dir: Optional[str | os.PathLike] = None,
                 tokenizer: Any = None, negatives: Optional[Negatives] = None):
        cfg.validate()
        if tokenizer is None and tokenizer_dir is None:
            raise ConfigError("ExampleBuilder needs a tokenizer: set data.tokenizer.path")
        if cfg.enabled("itm") and negatives is None and negatives_dir is None:
            raise ConfigError("the itm task needs the negative-sample files; point data.root at shards that hold "
                              "negatives/ or remove itm from objectives.tasks")
        self.cfg = cfg
        self.tokenizer_kind = tokenizer_kind
        self.tokenizer_dir = None if tokenizer_dir is None else str(tokenizer_dir)
        self.negatives_dir = None if negatives_dir is None else str(negatives_dir)
        self._tokenizer = tokenizer
        self._negatives = negatives
        self._ctx: Optional[BuildContext] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ctx"] = None
        # Reload big things in the worker when we know where they live.
        if self.tokenizer_dir is not None:
            state["_tokenizer"] = None
        if self.negatives_dir is not None:
            state["_negatives"] = None
        return state

    @property
    def context(self) -> BuildContext:
        if self._ctx is None:
            if self._tokenizer is None:
                from ofa_scale.data.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_kind, self.tokenizer_dir, num_bins=self.cfg.num_bins)
            if self._negatives is None and self.negatives_dir is not None and self.cfg.enabled("itm"):
                self._negatives = Negatives.load(self.negatives_dir)
            if self._tokenizer.num_bins != self.cfg.num_bins:
                raise ConfigError(f"objectives.num_bins={self.cfg.num_bins} but the tokenizer has "
                                  f"{self._tokenizer.num_bins} bins; make them agree")
            self._ctx = BuildContext(self.cfg, self._tokenizer, self._negatives)
        return self._ctx

    @property
    def tokenizer(self) -> Any:
        return self.context.tok

    def __call__(self, record: dict) -> list[Example]:
        ctx = self.context
        cfg = self.cfg
        source = record.get("source")
        meta = record.get("meta") or {}
        seed = int(record.get("seed", 0))
        if source == "vl":
            return vl_row_examples(ctx, meta, _image(record), seed)
        if source == "text":
            if not cfg.enabled("text_infill"):
                return []
            return [text_infill_example(ctx, str(meta.get("text", "")), seed)]
        if source == "image":
            if not cfg.enabled("image_infill"):
                return []
            codes = meta.get("codes") or []
            if len(codes) != 256:
                raise UserError(f"image record {record.get('key')!r} has {len(codes)} codes, expected 256; "
                                f"reconvert the shards")
            return [image_infill_example(ctx, _image(record), codes)]
        if source == "detection":
            if not cfg.enabled("detection"):
                return []
            return [detection_example(ctx, _image(record), list(meta.get("objects") or []), seed)]
        raise UserError(f"record {record.get('key')!r} has source {source!r}; expected vl, text, image or "
                        f"detection")


def _image(record: dict):
    img = record.get("image")
    if img is None:
        raise UserError(f"{record.get('source')} record {record.get('key')!r} has no image; the loader must "
                        f"decode the image member of every image source")
    return img

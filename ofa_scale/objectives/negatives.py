"""Negative samples for image-text matching (spec §1.5, §2.3): random captions, object swaps, same-type answers."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ofa_scale.errors import UserError

FILES = ("all_captions.txt", "object.txt", "type2ans.json")


def _choice_excluding(options: list[str], true_value: str, rng: random.Random) -> str:
    """OFA's exclusion rule: draw from all but the last option; if the draw equals the true value, take the last.

    A one-element list has nothing to exclude with, so its only element is returned.
    """
    if len(options) == 1:
        return options[0]
    pick = options[rng.randrange(len(options) - 1)]
    return options[-1] if pick == true_value else pick


@dataclass
class Negatives:
    captions: list[str]
    objects: list[str]
    type2ans: dict[str, list[str]]
    ans2type: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        # Inverse map over every type except "other"; a later type wins for an answer listed twice (as in OFA).
        self.ans2type = {a: t for t, answers in self.type2ans.items() if t != "other" for a in answers}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Negatives":
        d = Path(directory)
        missing = [f for f in FILES if not (d / f).is_file()]
        if missing:
            raise UserError(f"negative-sample directory {d} lacks {', '.join(missing)}; point it at the shards' "
                            f"negatives/ folder or disable the itm task")
        captions = _lines(d / "all_captions.txt")
        objects = _lines(d / "object.txt")
        try:
            type2ans = json.loads((d / "type2ans.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{d / 'type2ans.json'} is not valid JSON ({e}); regenerate it") from None
        if not captions:
            raise UserError(f"{d / 'all_captions.txt'} has no captions; fill it or disable the itm task")
        if not objects:
            raise UserError(f"{d / 'object.txt'} has no objects; fill it or disable the itm task")
        if (not isinstance(type2ans, dict) or not type2ans.get("other")
                or not all(isinstance(v, list) and v and all(isinstance(a, str) for a in v)
                           for v in type2ans.values())):
            raise UserError(f"{d / 'type2ans.json'} must map each question type to a non-empty list of answers "
                            f"and contain a non-empty \"other\" list; fix the file")
        return cls(captions=captions, objects=objects, type2ans=type2ans)

    def caption(self, caption: str, gt_objects: list[str], rng: random.Random) -> str:
        """A raw negative caption: with probability 0.4 (when objects are known) one ground-truth object is
        replaced by another object name; otherwise a random caption of the corpus."""
        p = rng.random()
        if gt_objects and p > 0.6:
            gt = gt_objects[rng.randrange(len(gt_objects))]
            return caption.replace(gt, _choice_excluding(self.objects, gt, rng))
        return self.captions[rng.randrange(len(self.captions))]

    def answer(self, answer: str, conf: float, rng: random.Random) -> str:
        """A negative VQA answer: same-type (counts ±1 for "how many") when the answer is confident and typed,
        else a random "other" answer; never the true answer (up to OFA's exclusion rule)."""
        p = rng.random()
        kind = self.ans2type.get(answer)
        if conf > p + 0.1 and kind is not None:
            if kind == "how many" and answer.isascii() and answer.isdigit() and p > 0.5:
                # OFA's guard meant for "0" compares a str to 0 and never fires, so "0" can become -1.
                return str(int(answer) + (-1 if rng.random() < 0.5 else 1))
            return _choice_excluding(self.type2ans[kind], answer, rng)
        return _choice_excluding(self.type2ans["other"], answer, rng)


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [s for s in (line.strip() for line in f) if s]

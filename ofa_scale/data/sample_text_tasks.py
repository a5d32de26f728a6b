"""The text-only finetuning TSVs of `ofa-preprocess sample` (issue 11): Gigaword-style headlines and the seven
GLUE tasks, in the column layouts of their `ofa-preprocess shards --format` names (data/tsv_formats.py), with
labels that follow from the text, so a model can learn them and a trivial baseline cannot.

* gigaword: a news sentence (an attribution, a time, then "the OBJECT in PLACE was VERB-ed by ACTOR") and its
  headline "ACTOR VERB OBJECT in PLACE", active voice, verb in the present tense (Gigaword's headline style).
  The lead-N words of the article are the attribution and the time, so they miss the headline.
* glue_sst2: a review sentence around one sentiment word; positive iff the word is positive.
* glue_cola: "the A verbs the B ." (grammatical, 1) or the same words in a broken order (0).
* glue_mrpc: a sentence and a rewording with synonyms (same semantics, 1) or a sentence about another actor or
  object (0).
* glue_qqp: two questions; duplicates iff they ask for the same attribute of the same thing (rephrased).
* glue_mnli / glue_rte: a premise "the P is V-ing in the L ."; the hypothesis repeats its place (entailment),
  names another place (contradiction) or adds a fact the premise does not settle (neutral; RTE: not_entailment).
* glue_qnli: a question about an attribute of a thing and a sentence stating that attribute (entailment) or
  another attribute of the thing (not_entailment).

Every label value appears with about the same frequency. Files: OUT/<format>_<split>.tsv for split in train,
val, test (disjoint random streams), e.g. gigaword_train.tsv, glue_sst2_test.tsv, plus sample_text.json.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json

SPLITS = ("train", "val", "test")
MAX_ROWS = 1_000_000

ACTORS = ("police", "farmers", "students", "workers", "doctors", "pilots", "rebels", "miners")
# past tense (article) -> present tense (headline)
ACTIONS = {"arrested": "arrest", "praised": "praise", "visited": "visit", "blocked": "block", "closed": "close",
           "defended": "defend", "attacked": "attack", "repaired": "repair"}
OBJECTS = ("mayor", "bridge", "museum", "factory", "embassy", "stadium", "airport", "harbour")
PLACES = ("paris", "cairo", "lima", "oslo", "delhi", "rome", "tokyo", "accra")
TIMES = ("on monday", "on tuesday", "late on friday", "early on sunday", "this week", "overnight")
SOURCES = ("officials said", "witnesses said", "state media reported", "a spokesman said")  # + "that …"
POSITIVE = ("wonderful", "brilliant", "delightful", "superb", "charming", "moving")
NEGATIVE = ("terrible", "dull", "awful", "boring", "clumsy", "tedious")
TOPICS = ("film", "story", "acting", "plot", "music", "ending", "script", "cast")
SYNONYMS = {"arrested": "detained", "praised": "applauded", "visited": "toured", "blocked": "barricaded",
            "closed": "shut", "defended": "protected", "attacked": "assaulted", "repaired": "fixed"}
ATTRIBUTES = {"height": ("how tall is", "is {n} metres tall"), "age": ("how old is", "is {n} years old"),
              "owner": ("who owns", "is owned by the {o}"), "colour": ("what colour is", "is painted {c}")}
COLOURS = ("red", "blue", "green", "white")
ACTIVITIES = ("reading", "cooking", "singing", "painting", "running", "sleeping")
PERSONS = ("teacher", "child", "farmer", "doctor", "singer", "pilot")
ROOMS = ("kitchen", "garden", "library", "station", "market", "park")
EXTRAS = ("with a friend", "for an hour", "after lunch", "in the rain", "on a holiday")


# ----------------------------------------------------------------------------------------------- rows
def gigaword_row(rng: random.Random, i: int) -> list[str]:
    actor, (past, present), obj, place = (rng.choice(ACTORS), rng.choice(sorted(ACTIONS.items())),
                                          rng.choice(OBJECTS), rng.choice(PLACES))
    article = (f"{rng.choice(SOURCES)} {rng.choice(TIMES)} that the {obj} in {place} was {past} by {actor} . "
               f"no one was hurt .")
    return [article, f"{actor} {present} {obj} in {place}"]


def sst2_row(rng: random.Random, i: int) -> list[str]:
    label = i % 2
    word = rng.choice(POSITIVE if label else NEGATIVE)
    sentence = rng.choice(("the {t} was {w} .", "i found the {t} {w} .", "a {w} {t} , from start to end .",
                           "overall the {t} is {w} ")).format(t=rng.choice(TOPICS), w=word)
    return [sentence, str(label)]


def cola_row(rng: random.Random, i: int) -> list[str]:
    label = i % 2
    a, b = rng.sample(ACTORS, 2)
    verb = rng.choice(sorted(ACTIONS))
    words = ["the", a, verb, "the", b]
    if not label:  # a broken word order: the verb misplaced
        words = rng.choice((["the", a, "the", b, verb], [verb, "the", a, "the", b], ["the", "the", a, verb, b]))
    return [f"s{i}", " ".join(words) + " .", str(label)]


def _report(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(ACTORS), rng.choice(sorted(ACTIONS)), rng.choice(OBJECTS)


def mrpc_row(rng: random.Random, i: int) -> list[str]:
    label = i % 2
    actor, verb, obj = _report(rng)
    first = f"the {actor} {verb} the {obj} yesterday ."
    if label:
        second = rng.choice(("yesterday the {a} {v} the {o} .", "the {o} was {v} by the {a} yesterday .")).format(
            a=actor, v=SYNONYMS[verb], o=obj)
    else:  # another actor or another object: the same shape, other content
        if rng.random() < 0.5:
            actor = rng.choice([a for a in ACTORS if a != actor])
        else:
            obj = rng.choice([o for o in OBJECTS if o != obj])
        second = f"yesterday the {actor} {SYNONYMS[verb]} the {obj} ."
    return [first, second, str(label)]


def _thing(rng: random.Random) -> str:
    return f"the {rng.choice(OBJECTS)} in {rng.choice(PLACES)}"


def qqp_row(rng: random.Random, i: int) -> list[str]:
    label = i % 2
    thing, attr = _thing(rng), rng.choice(sorted(ATTRIBUTES))
    q1 = f"{ATTRIBUTES[attr][0]} {thing} ?"
    if label:
        q2 = f"do you know {ATTRIBUTES[attr][0]} {thing} ?"
    else:
        other = rng.choice([a for a in ATTRIBUTES if a != attr])
        q2 = f"do you know {ATTRIBUTES[other][0]} {thing} ?"
    return [str(i), str(2 * i), str(2 * i + 1), q1, q2, str(label)]


def _premise(rng: random.Random) -> tuple[str, str, str]:
    person, room = rng.choice(PERSONS), rng.choice(ROOMS)
    return f"the {person} is {rng.choice(ACTIVITIES)} in the {room} .", person, room


def _nli(rng: random.Random, kind: str) -> tuple[str, str]:
    premise, person, room = _premise(rng)
    if kind == "entailment":
        hypothesis = f"the {person} is in the {room} ."
    elif kind == "contradiction":
        hypothesis = f"the {person} is in the {rng.choice([r for r in ROOMS if r != room])} ."
    else:
        hypothesis = f"the {person} is in the {room} {rng.choice(EXTRAS)} ."
    return premise, hypothesis


def mnli_row(rng: random.Random, i: int) -> list[str]:
    # the converter's MNLI labels: 0 neutral (maybe), 1 entailment (yes), 2 contradiction (no)
    label = i % 3
    premise, hypothesis = _nli(rng, ("neutral", "entailment", "contradiction")[label])
    return [premise, hypothesis, str(label)]


def rte_row(rng: random.Random, i: int) -> list[str]:
    entail = i % 2 == 0
    premise, hypothesis = _nli(rng, "entailment" if entail else rng.choice(("contradiction", "neutral")))
    return [str(i), premise, hypothesis, "entailment" if entail else "not_entailment"]


def qnli_row(rng: random.Random, i: int) -> list[str]:
    entail = i % 2 == 0
    thing, attr = _thing(rng), rng.choice(sorted(ATTRIBUTES))
    stated = attr if entail else rng.choice([a for a in ATTRIBUTES if a != attr])
    fact = ATTRIBUTES[stated][1].format(n=rng.randint(2, 90), o=rng.choice(ACTORS), c=rng.choice(COLOURS))
    return [str(i), f"{ATTRIBUTES[attr][0]} {thing} ?", f"{thing} {fact} .",
            "entailment" if entail else "not_entailment"]


ROWS: dict[str, Callable[[random.Random, int], list[str]]] = {
    "gigaword": gigaword_row, "glue_cola": cola_row, "glue_sst2": sst2_row, "glue_mrpc": mrpc_row,
    "glue_qqp": qqp_row, "glue_mnli": mnli_row, "glue_rte": rte_row, "glue_qnli": qnli_row,
}


def task_rows(fmt: str, split: str, n: int, seed: int) -> list[list[str]]:
    """`n` rows of format `fmt` for `split`, shuffled (so labels are not in a fixed cycle)."""
    rng = random.Random(f"{seed}-text-{fmt}-{split}")
    rows = [ROWS[fmt](rng, i) for i in range(n)]
    rng.shuffle(rows)
    return rows


def write_text_corpus(out_dir: str | Path, rows: int, eval_rows: int, seed: int = 0) -> dict[str, Path]:
    """OUT/<format>_<split>.tsv for every format of ROWS: `rows` training rows, `eval_rows` per held-out split;
    byte-identical for the same arguments. Returns {file name: path}."""
    for flag, n in (("--text-rows", rows), ("--text-eval-rows", eval_rows)):
        if not 1 <= n <= MAX_ROWS:
            raise UserError(f"{flag} must be between 1 and {MAX_ROWS} (got {n}).")
    out = Path(out_dir)
    sizes = {"train": rows, "val": eval_rows, "test": eval_rows}
    paths: dict[str, Path] = {}
    for fmt in ROWS:
        for split in SPLITS:
            name = f"{fmt}_{split}.tsv"
            lines = ["\t".join(r) for r in task_rows(fmt, split, sizes[split], seed)]
            atomic_write_bytes(out / name, ("\n".join(lines) + "\n").encode("utf-8"))
            paths[name] = out / name
    atomic_write_json(out / "sample_text.json", {"format_version": 1, "seed": seed, "rows": sizes,
                                                 "formats": list(ROWS)})
    return paths

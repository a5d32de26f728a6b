"""The finetuning TSVs of `ofa-preprocess sample`: they convert with `ofa-preprocess shards --format`, their labels
are true for the scene each image was drawn from, the held-out splits show other images, and they are deterministic."""

import base64
import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ofa_scale.cli.preprocess import main as preprocess_main
from ofa_scale.data import sample_finetune as sf
from ofa_scale.data.sample_corpus import COLOURS, NUMBER_WORDS, PLURAL, SHAPES, TSV_NAMES

TRAIN, EVAL, SEED = 18, 9, 3
SIZES = {"train": TRAIN, "val": EVAL, "test": EVAL}
KIND_OF = {**{k: k for k in SHAPES}, **{p: k for k, p in PLURAL.items()}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    assert preprocess_main(["sample", "--out", str(out), "--rows", "8", "--seed", str(SEED), "--finetune-images",
                            str(TRAIN), "--finetune-eval-images", str(EVAL)]) == 0
    return out


def _rows(path):
    return [line.split("\t") for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def _pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.urlsafe_b64decode(b64))).convert("RGB")).astype(int)


def _scenes():
    """image-id -> (scene, stored image) for every split, regenerated from the generator's public entry."""
    return {img.image_id: img for split, n in SIZES.items() for img in (sf.scene_image(split, i, SEED)
                                                                        for i in range(n))}


@pytest.fixture(scope="module")
def scenes(corpus):
    scenes = _scenes()
    # the scenes are the pictures: every shape's box centre has the shape's colour (all shapes contain it)
    for img in scenes.values():
        px = _pixels(img.image)
        assert px.shape[:2] == (img.scene.height, img.scene.width)
        for s in img.scene.shapes:
            x0, y0, x1, y1 = s.box
            assert np.abs(px[(y0 + y1) // 2, (x0 + x1) // 2] - COLOURS[s.colour]).max() < 48
    return scenes


def _scene_of(scenes, image_id, b64):
    img = scenes[int(image_id)]
    assert img.image == b64  # the row shows the image of its scene
    return img.scene


def test_every_file_converts_with_zero_rejects(corpus, tmp_path):
    meta = json.loads((corpus / "finetune" / "sample_finetune.json").read_text())
    assert set(meta["files"]) == set(sf.FILES)
    for name, (fmt, split) in sf.FILES.items():
        rows = _rows(corpus / "finetune" / name)
        assert len(rows) == meta["files"][name]["rows"] > 0, name
        out = tmp_path / name
        assert preprocess_main(["shards", "--format", fmt, "--input", str(corpus / "finetune" / name),
                                "--out", str(out), "--no-progress"]) == 0
        src = json.loads((out / "manifest.json").read_text())["sources"][fmt]
        assert (src["rows_read"], src["samples_written"], src["rejected"]) == (len(rows), len(rows), 0), name


def test_pretraining_files_do_not_depend_on_the_finetune_options(corpus, tmp_path):
    assert preprocess_main(["sample", "--out", str(tmp_path / "p"), "--rows", "8", "--seed", str(SEED),
                            "--finetune-images", "0"]) == 0
    assert not (tmp_path / "p" / "finetune").exists()
    for name in TSV_NAMES + ("negative_sample/all_captions.txt", "sample_corpus.json"):
        assert (tmp_path / "p" / name).read_bytes() == (corpus / name).read_bytes(), name


def test_same_seed_same_bytes_other_seed_differs(corpus, tmp_path):
    sf.write_finetune_corpus(tmp_path / "again", TRAIN, EVAL, seed=SEED)
    sf.write_finetune_corpus(tmp_path / "other", TRAIN, EVAL, seed=SEED + 1)
    for name in sf.FILES:
        assert (tmp_path / "again" / name).read_bytes() == (corpus / "finetune" / name).read_bytes(), name
        assert (tmp_path / "other" / name).read_bytes() != (corpus / "finetune" / name).read_bytes(), name
    # a held-out split does not move when the training split grows
    sf.write_finetune_corpus(tmp_path / "bigger", TRAIN + 5, EVAL, seed=SEED)
    assert (tmp_path / "bigger" / "vqa_val.tsv").read_bytes() == (corpus / "finetune" / "vqa_val.tsv").read_bytes()


def test_splits_show_disjoint_images_also_from_pretraining(corpus):
    images, ids = {}, {}
    for name, (fmt, split) in sf.FILES.items():
        col = _image_column(fmt)
        for r in _rows(corpus / "finetune" / name):
            images.setdefault(split, set()).add(r[col])
            ids.setdefault(split, set()).add(r[1])
    assert {s: len(v) for s, v in ids.items()} == SIZES
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not images[a] & images[b] and not ids[a] & ids[b], (a, b)
    pretrain = {r[1] for r in _rows(corpus / TSV_NAMES[0])}
    assert not pretrain & set().union(*images.values())


def _image_column(fmt):
    return {"caption": 4, "vqa": 5, "refcoco": 4, "snli_ve": 2}[fmt]


def test_captions_name_every_shape_group_and_nothing_else(corpus, scenes):
    fin = corpus / "finetune"
    stage2 = {}
    for name in ("caption_stage2_train.tsv", "caption_val.tsv", "caption_test.tsv"):
        for uid, iid, caps, objs, b64 in _rows(fin / name):
            scene = _scene_of(scenes, iid, b64)
            assert uid == iid and objs.split("&&") == list(dict.fromkeys(s.kind for s in scene.shapes))
            refs = caps.split("&&")
            assert len(refs) == len(set(refs)) == sf.CAPTIONS_PER_IMAGE
            stage2[iid] = refs
            for cap in refs:
                assert cap == cap.lower() and len(cap.split()) <= 20
                counts = Counter()
                for m in re.finditer(r"\b(a|an|" + "|".join(NUMBER_WORDS) + r") (" + "|".join(COLOURS) + r") (\w+)",
                                     cap):
                    n = 1 if m[1] in ("a", "an") else NUMBER_WORDS.index(m[1])
                    counts[(m[2], KIND_OF[m[3]])] += n
                assert counts == Counter((s.colour, s.kind) for s in scene.shapes), cap
                assert scene.background in cap
    stage1 = _rows(fin / "caption_stage1_train.tsv")
    assert len(stage1) == sf.CAPTIONS_PER_IMAGE * TRAIN
    assert len({r[0] for r in stage1}) == len(stage1)
    for uid, iid, cap, objs, b64 in stage1:
        assert cap in stage2[iid] and "&&" not in cap


def _vqa_truth(q, scene):
    kinds = [s.kind for s in scene.shapes]
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        return str(kinds.count(KIND_OF[m[1]]))
    if m := re.fullmatch(r"how many (\w+) shapes are in the picture", q):
        return str(sum(s.colour == m[1] for s in scene.shapes))
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        return next(s.colour for s in scene.shapes if s.kind == m[1])
    if m := re.fullmatch(r"what shape is the (\w+) (?:object\?|thing)", q):
        return next(s.kind for s in scene.shapes if s.colour == m[1])
    m = re.fullmatch(r"is there an? (\w+) (\w+) in the image\?", q)
    return "yes" if any((s.colour, s.kind) == (m[1], m[2]) for s in scene.shapes) else "no"


def test_vqa_best_answer_is_true_and_ids_are_integers(corpus, scenes):
    qids, answers = [], Counter()
    for split in sf.SPLITS:
        for qid, iid, q, ans, objs, b64 in _rows(corpus / "finetune" / f"vqa_{split}.tsv"):
            scene = _scene_of(scenes, iid, b64)
            qids.append(int(qid))
            assert q == q.lower()
            items = [(float(c), a) for c, _, a in (x.partition("|!+") for x in ans.split("&&"))]
            assert all(0 < c <= 1 for c, _ in items) and max(c for c, _ in items) == 1.0
            best = max(items)[1]
            assert best == _vqa_truth(q, scene), (q, ans)
            answers[best] += 1
            for c, a in items:  # a second answer paraphrases the count, or is the annotators' minority view
                if c < 1.0:
                    assert a == (NUMBER_WORDS[int(best)] if best.isdigit() else {"yes": "no", "no": "yes"}[best])
    assert len(set(qids)) == len(qids)
    assert {"yes", "no"} <= set(answers) and any(a.isdigit() for a in answers)


def test_refcoco_boxes_are_the_referred_shape_inside_the_image(corpus, scenes):
    uids = []
    for split in sf.SPLITS:
        for uid, iid, text, box, b64 in _rows(corpus / "finetune" / f"refcoco_{split}.tsv"):
            scene = _scene_of(scenes, iid, b64)
            uids.append(uid)
            x0, y0, x1, y1 = map(float, box.split(","))
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            shape = next(s for s in scene.shapes if tuple(map(float, s.box)) == (x0, y0, x1, y1))
            assert shape.name in text.lower()
            # the expression fits no other shape: another shape of the same name needs a size or side qualifier
            twins = [s for s in scene.shapes if s.name == shape.name and s is not shape]
            assert not twins or re.search(r"\b(small|large|left|right)\b", text)
    assert len(set(uids)) == len(uids)


def _snli_truth(hyp, scene):
    kinds = [s.kind for s in scene.shapes]
    if any(t.split("{n}")[1] and hyp.endswith(t.split("{n}")[1]) for t in sf.NEUTRAL_TEMPLATES) or \
            hyp.startswith("someone drew"):
        return "neutral"
    if m := re.fullmatch(r"there is an? (\w+) (\w+) in the picture", hyp):
        true = any((s.colour, s.kind) == (m[1], m[2]) for s in scene.shapes)
    elif m := re.fullmatch(r"the picture shows (\w+) (\w+)", hyp):
        true = kinds.count(KIND_OF[m[2]]) == NUMBER_WORDS.index(m[1])
    else:
        m = re.fullmatch(r"there (?:is|are) (\w+) shapes? in total", hyp)
        true = len(kinds) == NUMBER_WORDS.index(m[1])
    return "entailment" if true else "contradiction"


def test_snli_ve_labels_are_true_for_the_scene_and_all_occur(corpus, scenes):
    for split in sf.SPLITS:
        labels = Counter()
        captions = {r[1]: r[2].split("&&") for r in _rows(corpus / "finetune" / (
            "caption_stage2_train.tsv" if split == "train" else f"caption_{split}.tsv"))}
        for uid, iid, b64, hyp, premise, label in _rows(corpus / "finetune" / f"snli_ve_{split}.tsv"):
            scene = _scene_of(scenes, iid, b64)
            assert label == _snli_truth(hyp, scene), (hyp, label)
            assert premise in captions[iid]  # the text premise is a true caption of the same image
            labels[label] += 1
        assert labels == {lab: SIZES[split] for lab in sf.SNLI_LABELS}


def test_cli_refuses_a_bad_size_in_one_line(tmp_path, capsys):
    assert preprocess_main(["sample", "--out", str(tmp_path / "c"), "--rows", "8", "--finetune-eval-images",
                            "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--finetune-eval-images" in err

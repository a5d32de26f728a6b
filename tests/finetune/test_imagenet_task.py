"""The ImageNet-1K task (spec §7.5): builder tokens, the class-name file and trie, constraint masks at every decoder
position, the timm + RandomAugment training transform, the eval transform and ImageNet normalisation (in the
task's evaluation batches and the workload's training batches), all-candidate prediction, validation on a fraction
of the split, the recipe's OFA values and the sample corpus' classification rows."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import ConfigError, UserError
from ofa_scale.finetune import imagenet_transforms as T
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.evaluate import in_fraction, read_items
from ofa_scale.finetune.imagenet import ImageNetTask, read_class_names
from ofa_scale.finetune.task import make_task

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from closed_set_helpers import collate, constrained_loss_gradient, jpeg_b64, shard_records, tiny_model  # noqa: E402
from test_generate import biased_towards  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BOS, PAD, EOS = 0, 1, 2
# spec §3's verified pieces: Ġwhat 99, Ġdoes 473, Ġthe 5, Ġimage 2274, Ġdescribe 6190, ? 116; Ġa 10, Ġman 313,
# Ġmaybe 2085
PROMPT_IDS = [99, 473, 5, 2274, 6190, 116]
A, MAN, IMAGE, MAYBE = 10, 313, 2274, 2085
# a synset_words-style file: WordNet ids, a bare name, a blank line, extra spaces and a repeated name
CLASS_FILE = "n00000001 a man\nn00000002 a image\nman\n\nn00000004   maybe \nn00000005 a man\n"
NAMES = ["a man", "a image", "man", "maybe"]


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return load_tokenizer("gpt2-bpe", bpe_dir)


@pytest.fixture
def class_file(tmp_path) -> Path:
    path = tmp_path / "synset_words.txt"
    path.write_text(CLASS_FILE)
    return path


def make(tok, class_file, **kw) -> ImageNetTask:
    fields = dict(name="imagenet", prompt_type="none", image_size=32, class_names=str(class_file),
                  decoding=DecodingSection(inference="allcand", batch_size=4))
    fields.update(kw)
    return make_task(TaskSection(**fields), tok)


def record(name="a man", uid="0", seed=3, colour=(10, 200, 10)):
    return {"key": uid, "seed": seed, "meta": {"uniq_id": uid, "label_index": 1, "class_name": name},
            "image": Image.new("RGB", (40, 30), colour)}


# ------------------------------------------------------------------------------------------- builder tokens
def test_class_names_file(class_file, tmp_path):
    assert read_class_names(class_file) == NAMES
    with pytest.raises(UserError, match="cannot be read"):
        read_class_names(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="no class names"):
        read_class_names(tmp_path / "empty.txt")


def test_class_names_are_required(tok):
    with pytest.raises(ConfigError, match="task.class_names"):
        make_task(TaskSection(name="imagenet"), tok)


@pytest.mark.parametrize("name, answer", [("a man", [A, MAN]), ("maybe", [MAYBE]), ("  a   image ", [A, IMAGE])])
def test_literal_tokens_and_constraint_at_every_position(tok, class_file, name, answer):
    task = make(tok, class_file)
    ex, = task.train_examples(record(name))
    assert ex["source"] == [BOS, *PROMPT_IDS, EOS]
    assert ex["prev_output"] == [BOS, *answer]
    assert ex["target"] == [*answer, EOS]
    # the trie over [bos] + name + [eos]: first tokens a / man / maybe, after "a" man / image, then eos
    nexts = {(): [A, MAN, MAYBE], (A,): [MAN, IMAGE], (A, MAN): [EOS], (A, IMAGE): [EOS], (MAN,): [EOS],
             (MAYBE,): [EOS]}
    assert ex["constraint"] == [nexts[tuple(answer[:k])] for k in range(len(answer) + 1)]
    assert ex["task"] == "imagenet" and ex["conf"] == 1.0 and ex["patch_mask"]
    assert ex["image"].shape == (3, 32, 32) and ex["image"].dtype == torch.uint8
    s, t = task.lengths()
    assert s == len(PROMPT_IDS) + 2 and t == 1 + 2  # [bos] + the longest name (2 tokens)


def test_names_outside_the_file(tok, class_file):
    task = make(tok, class_file)
    assert task.train_examples(record("a dog")) == []
    assert task.skipped["answer_not_in_candidates"] == 1
    item = task.eval_item(record("a dog", uid="7"))  # evaluated, can only be wrong
    assert item.id == "7" and item.reference == {"label": "a dog"}
    assert task.skipped["label_not_in_class_names"] == 1


def test_constrained_loss_puts_no_mass_outside_the_trie(tok, class_file):
    task = make(tok, class_file)
    examples = [task.train_examples(record(n, uid=str(i)))[0] for i, n in enumerate(NAMES)]
    batch = collate(examples, "imagenet", task.lengths(), 32, len(tok))
    masks, target = batch["constraint_masks"], batch["target"]
    for b, ex in enumerate(examples):  # every decoder position of every row allows exactly the trie's next layer
        for t, allowed in enumerate(ex["constraint"]):
            assert masks[b, t].nonzero().flatten().tolist() == sorted(allowed)
    _, grad = constrained_loss_gradient(masks, target, batch["conf"])
    valid = target != PAD
    assert float(grad[valid][~masks[valid]].abs().max()) == 0.0
    assert float(grad[~valid].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------ transforms
def test_the_training_transform_is_timms_with_ofas_arguments():
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms

    tr = T.TrainTransform(64)
    crop, flip = tr.primary.transforms
    assert isinstance(crop, RandomResizedCropAndInterpolation) and crop.size == (64, 64)
    assert crop.scale == (0.08, 1.0) and "bicubic" in str(crop)
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    ra, = tr.secondary.transforms  # rand-m9-mstd0.5-inc1: 2 ops, magnitude 9 ± 0.5, the increasing op set
    assert isinstance(ra, RandAugment) and ra.num_layers == 2
    assert {op.name for op in ra.ops} >= {"SolarizeIncreasing", "PosterizeIncreasing", "ColorIncreasing"}
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    _, norm, erase = tr.final.transforms
    assert norm.mean.tolist() == pytest.approx(T.IMAGENET_MEAN) and norm.std.tolist() == pytest.approx(T.IMAGENET_STD)
    assert isinstance(erase, RandomErasing) and erase.probability == 0.25 and erase.mode == "pixel"
    assert erase.max_count == 1


def test_ofas_random_augment_runs_after_randaugment_and_feeds_the_final_stage(monkeypatch):
    seen = []

    def fake_random_augment(img, rng, num_ops, magnitude, translate_px):
        seen.append((img.size, num_ops, magnitude, translate_px))
        return Image.new("RGB", img.size, (12, 34, 56))

    monkeypatch.setattr(T, "random_augment", fake_random_augment)
    tr = T.TrainTransform(48)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    outs = [tr(photo, seed) for seed in range(8)]
    # RandomAugment(2, 7) gets the cropped 48×48 image; translate 10 px at 480 px, scaled to the size
    assert seen == [((48, 48), 2, 7, pytest.approx(1.0))] * 8
    for out in outs:  # its output is what ToTensor/Normalize/RandomErasing turn into the pixels (≤ 1/3 erased)
        same = (out == torch.tensor([12, 34, 56], dtype=torch.uint8).view(3, 1, 1)).all(dim=0)
        assert float(same.float().mean()) >= 0.6


def test_training_pixels_are_seeded_per_record_and_leave_the_global_streams_alone():
    tr = T.TrainTransform(32)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    a, b, c = tr(photo, 11), tr(photo, 11), tr(photo, 12)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pixels_round_trip_the_normalisation():
    from torchvision import transforms

    pixels = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    normalised = transforms.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)(pixels.float() / 255)
    assert torch.equal(T.to_pixels(normalised), pixels)
    assert T.to_pixels(torch.full((3, 2, 2), 50.0)).max() == 255  # erasing noise beyond the range saturates


def test_eval_transform_is_resize_and_imagenet_normalisation():
    from torchvision import transforms

    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    ofa = transforms.Compose([transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.ToTensor(), transforms.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
    a, b = T.eval_pixels(photo, 32), T.eval_pixels(photo, 32)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    got = T.normalise_images(a[None], torch.tensor([True]), torch.float32)[0]
    assert torch.allclose(got, ofa(photo), atol=1e-6)
    assert float(T.normalise_images(a[None], torch.tensor([False]), torch.float32).abs().max()) == 0.0


def test_train_augment_none_trains_on_the_evaluation_resize(tok, class_file):
    photo = Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    rec = {**record(), "image": photo}
    augmented = make(tok, class_file).train_examples(rec)[0]["image"]
    plain = make(tok, class_file, extra={"train_augment": "none"}).train_examples(rec)[0]["image"]
    assert torch.equal(plain, T.eval_pixels(photo, 32))
    assert not torch.equal(augmented, plain)  # OFA's pipeline (the default) crops and augments
    with pytest.raises(ConfigError, match="train_augment is 'timm'; give one of ofa, none"):
        make(tok, class_file, extra={"train_augment": "timm"})


def test_evaluation_and_training_batches_use_imagenet_statistics(tok, class_file):
    from ofa_scale.finetune.workload import FinetuneWorkload

    task = make(tok, class_file)
    items = [task.eval_item(record(n, uid=str(i), colour=(40 * i, 90, 200))) for i, n in enumerate(NAMES)]
    batch = task._device_batch(items, torch.device("cpu"), torch.float32)
    expected = T.normalise_images(torch.stack([i.image for i in items]), torch.ones(4, dtype=torch.bool),
                                  torch.float32)
    assert torch.equal(batch["patch_images"], expected)
    # the finetuning workload's input builder normalises this task's training batches the same way
    examples = [task.train_examples(record(n, uid=str(i)))[0] for i, n in enumerate(NAMES)]
    group = collate(examples, "imagenet", task.lengths(), 32, len(tok))
    workload = object.__new__(FinetuneWorkload)
    workload.cfg, workload.task = SimpleNamespace(train=SimpleNamespace(seed=0)), task
    inputs = workload.input_builder(1, 0, 1, torch.device("cpu"), torch.float32)("vl", group, 0)
    assert torch.equal(inputs["patch_images"],
                       T.normalise_images(group["patch_images"], group["patch_masks"], torch.float32))


# ------------------------------------------------------------------------------------------------ prediction
@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("favourite, name", [(MAYBE, "maybe"), (MAN, "man")])
def test_allcand_predicts_class_names_beam_agrees_and_accuracy(tok, class_file, model, favourite, name):
    allcand = make(tok, class_file)
    beam = make(tok, class_file, decoding=DecodingSection(inference="beam", beam=4, unnormalized=True, batch_size=4))
    items = [allcand.eval_item(record(n, uid=str(i))) for i, n in enumerate(["man", "a man", "maybe", "man"])]
    with biased_towards(model, favourite, strength=10.0):
        a = allcand.predict(model, items, device=torch.device("cpu"))
        b = beam.predict(model, items, device=torch.device("cpu"))
    assert [p["label"] for p in a] == [name] * 4 and b == a
    expected = sum(i.reference["label"] == name for i in items) / 4
    assert allcand.score(a, items) == {"accuracy": pytest.approx(expected)}
    results = json.loads(json.dumps([allcand.result_entry(p) for p in a]))
    assert results[0] == {"id": "0", "label": name}
    assert allcand.main_metric == "accuracy" and allcand.name == allcand.source == "imagenet"


# ------------------------------------------------------------------------------------------- shards, fraction
def test_records_read_back_from_real_shards_and_the_validation_fraction(tok, class_file, tmp_path):
    rows = [[jpeg_b64(40 + i, 30, i), str(1 + i % 4), NAMES[i % 4]] for i in range(10)]
    records = sorted(shard_records(tmp_path, "imagenet", rows), key=lambda r: int(r["meta"]["uniq_id"]))
    task = make(tok, class_file)
    items = [task.eval_item(r) for r in records]
    assert [i.id for i in items] == [str(n) for n in range(1, 11)]  # the converter's line numbers
    assert [i.reference["label"] for i in items] == [NAMES[n % 4] for n in range(10)]
    assert items[3].image_size == (43, 30)
    assert task.train_examples(records[1])[0]["target"] == [A, IMAGE, EOS]
    assert [i for i in range(10) if in_fraction(i, 0.3)] == [3, 6, 9]  # evenly spaced, 3 of 10
    assert sum(in_fraction(i, 0.1) for i in range(50_000)) == 5_000
    whole = [idx for idx, _ in read_items(task, tmp_path / "shards")[0]]
    part = [idx for idx, _ in read_items(task, tmp_path / "shards", fraction=0.5)[0]]
    assert whole == list(range(10)) and part == [1, 3, 5, 7, 9]
    ranks = [[idx for idx, _ in read_items(task, tmp_path / "shards", fraction=0.5, dp_rank=r, dp_size=2)[0]]
             for r in (0, 1)]
    assert ranks == [[1, 5, 9], [3, 7]]  # the kept records shared round-robin


def test_valid_fraction_is_checked():
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="valid_fraction"):
            TaskSection(name="imagenet", valid_fraction=bad).validate()
    TaskSection(name="imagenet", valid_fraction=0.25).validate()


# ------------------------------------------------------------------------------------------------ recipe
def test_recipe_has_ofas_values():
    """run_scripts/image_classify/train_imagenet_distributed.sh (spec §7.5), copied here, not from the YAML."""
    from ofa_scale.training.config import load_training_config

    cfg = load_training_config(REPO / "configs" / "finetune" / "imagenet_large.yaml", [])
    assert cfg.model.arch == "ofa_large" and cfg.model.pretrained
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (2 * 8 * 4 * 4, 4)
    assert cfg.optim.lr == pytest.approx(5e-5) and cfg.train.steps == 160_000
    assert cfg.schedule.warmup_steps == 1000 and cfg.schedule.end_lr == 0.0
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.clip_norm) == ([0.9, 0.999], 1e-8,
                                                                                             0.01, 1.0)
    assert cfg.objectives.label_smoothing == pytest.approx(0.1)
    ov = cfg.model.overrides
    assert ov["encoder_drop_path_rate"] == ov["decoder_drop_path_rate"] == pytest.approx(0.1)
    assert (ov["dropout"], ov["attention_dropout"], ov["resnet_drop_path_rate"]) == (0.1, 0.0, 0.0)
    assert cfg.train.freeze_encoder_embedding and cfg.train.freeze_decoder_embedding and not cfg.train.freeze_resnet
    t = cfg.task
    assert (t.name, t.prompt_type, t.image_size, t.max_src_length, t.max_tgt_length) == ("imagenet", "none", 480,
                                                                                         128, 30)
    assert t.constrained_training and t.class_names and t.best_metric == "accuracy"
    assert (t.decoding.inference, t.decoding.batch_size) == ("allcand", 20)
    assert t.valid_interval == 0 and 0 < t.valid_fraction < 1  # epoch ends, on a subset
    assert cfg.train.epochs * (1_281_167 // 256) >= 160_000  # the epochs do not cut OFA's updates short


def test_check_builds_the_recipe_for_8_ranks(tmp_path, bpe_dir):
    """`ofa-train --check` (in process): workload, task (its class file) and layout build with OFA's batch of 256
    on 8 ranks, over shards of the sample rows."""
    from ofa_scale.cli.preprocess import main as preprocess
    from ofa_scale.data.sample_classes import SYNSET_FILE, write_classes_corpus
    from ofa_scale.training.check import check_config
    from ofa_scale.training.config import load_training_config

    tsv = write_classes_corpus(tmp_path / "tsv", images=260, eval_images=1, seed=1)
    assert preprocess(["shards", "--format", "imagenet", "--input", str(tsv["imagenet_train.tsv"]), "--out",
                       str(tmp_path / "train"), "--no-progress"]) == 0
    sets = [f"data.train={tmp_path / 'train'}", f"data.valid={tmp_path / 'train'}", f"data.tokenizer.path={bpe_dir}",
            "model.pretrained=null", "schedule.warmup_steps=0"]
    recipe = REPO / "configs" / "finetune" / "imagenet_large.yaml"
    with pytest.raises(UserError, match="class_names"):  # the recipe's placeholder class file does not exist
        check_config(load_training_config(recipe, sets), 8)
    report = check_config(load_training_config(recipe, [*sets, f"task.class_names={tmp_path / 'tsv' / SYNSET_FILE}"]),
                          8)
    assert "config is valid for 8 process(es)" in report and "model: ofa_large (" in report and "dp 8" in report


# ------------------------------------------------------------------------------------------------ sample data
def test_sample_classification_rows_are_true_and_held_out(tmp_path):
    import base64
    import io

    from ofa_scale.data.sample_classes import CLASSES, SYNSET_FILE, write_classes_corpus
    from ofa_scale.data.sample_corpus import COLOURS

    paths = write_classes_corpus(tmp_path, images=24, eval_images=12, seed=4)
    assert set(paths) == {"imagenet_train.tsv", "imagenet_val.tsv", "imagenet_test.tsv"}
    names = read_class_names(tmp_path / SYNSET_FILE)
    assert names == [f"{c} {k}" for c, k in CLASSES] and len(names) == 40
    assert (tmp_path / SYNSET_FILE).read_text().splitlines()[0] == "n90000001 red circle"
    rows = {split: [line.split("\t") for line in paths[f"imagenet_{split}.tsv"].read_text().splitlines()]
            for split in ("train", "val", "test")}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [24, 12, 12]
    train_images = {r[0] for r in rows["train"]}
    assert not train_images & {r[0] for s in ("val", "test") for r in rows[s]}
    for image, index, name in rows["train"] + rows["test"]:
        assert names[int(index) - 1] == name
        pixels = np.asarray(Image.open(io.BytesIO(base64.urlsafe_b64decode(image))).convert("RGB"), dtype=float)
        # the class colour is the image's main colour (the shape spans 55-85% of the shorter side; a star fills
        # about a third of its box)
        share = {c: float((np.abs(pixels - rgb).max(axis=-1) < 40).mean()) for c, rgb in COLOURS.items()}
        assert share[name.split()[0]] > 0.05 and max(share, key=share.get) == name.split()[0], (name, share)
    again = write_classes_corpus(tmp_path / "again", images=24, eval_images=12, seed=4)
    assert again["imagenet_test.tsv"].read_bytes() == paths["imagenet_test.tsv"].read_bytes()

import collections

import pytest
import torch
from PIL import Image

from ofa_scale.errors import ConfigError
from ofa_scale.objectives import (TASK_ID, TASKS, Collator, Composition, ExampleBuilder, ObjectivesConfig,
                                  group_names, to_model_inputs)
from ofa_scale.objectives.batching import DUMMY_PIXEL, constraint_mask, loss_inputs


def test_composition_defaults_reproduce_ofa():
    comp = Composition.from_config(ObjectivesConfig(), vl_rows=8)
    assert comp.counts == {"vl": 8, "text": 2, "image": 1, "detection": 1}
    assert comp.group_sizes() == {"vl": 16, "aux": 4}
    assert Composition.from_config(ObjectivesConfig(), 16).counts == {"vl": 16, "text": 4, "image": 2, "detection": 2}


def test_composition_rejects_fractional_counts_and_drops_disabled_sources():
    with pytest.raises(ConfigError, match="multiple of 8"):
        Composition.from_config(ObjectivesConfig(), vl_rows=4)
    cfg = ObjectivesConfig(mix={"vl": 4, "text": 2, "image": 0, "detection": 1})
    assert Composition.from_config(cfg, 4).counts == {"vl": 4, "text": 2, "image": 0, "detection": 1}
    no_aux = ObjectivesConfig(tasks=["caption", "vqa"])
    comp = Composition.from_config(no_aux, 3)
    assert comp.counts == {"vl": 3, "text": 0, "image": 0, "detection": 0} and comp.group_sizes() == {"vl": 3}
    partial = ObjectivesConfig(mix={"text": 4})  # unnamed sources keep OFA's ratios
    assert Composition.from_config(partial, 8).counts == {"vl": 8, "text": 4, "image": 1, "detection": 1}


def small_cfg(**kw):
    cfg = ObjectivesConfig(**kw)
    cfg.vl.image_size, cfg.aux.image_size = 32, 32
    cfg.vl.source_length, cfg.vl.target_length = 48, 12
    cfg.aux.source_length, cfg.aux.target_length = 64, 40
    return cfg


def ex(task, src_len, tgt_len, size=None, conf=1.0, code=False):
    return {"task": task, "source": [0] + [5] * (src_len - 2) + [2], "prev_output": [0] + [7] * (tgt_len - 1),
            "target": [7] * (tgt_len - 1) + [2], "conf": conf, "patch_mask": size is not None, "code_mask": code,
            "image": None if size is None else torch.full((3, size, size), 200, dtype=torch.uint8)}


def test_collate_fixed_shapes_padding_truncation_and_stats():
    cfg = small_cfg()
    coll = Collator(cfg, Composition.from_config(cfg, 8))
    batch = coll([ex("caption", 10, 5, 32), ex("itm", 60, 2, 32, conf=0.5), ex("text_infill", 70, 45, conf=2.0),
                  ex("image_infill", 11, 20, 32, 2.0, code=True)])
    assert group_names(batch) == ["vl", "aux"]
    vl, aux = batch["vl"], batch["aux"]
    assert vl["src_tokens"].shape == (16, 48) and vl["target"].shape == (16, 12) and vl["patch_images"].shape == (16, 3, 32, 32)
    assert aux["src_tokens"].shape == (4, 64) and aux["target"].shape == (4, 40) and aux["patch_images"].dtype == torch.uint8
    assert vl["src_tokens"][0, :10].tolist() == [0] + [5] * 8 + [2] and (vl["src_tokens"][0, 10:] == 1).all()
    assert vl["src_tokens"][1, -1].item() == 2  # truncated source keeps its eos
    assert vl["task_ids"].tolist()[:3] == [TASK_ID["caption"], TASK_ID["itm"], -1]
    assert (vl["target"][2:] == 1).all() and vl["conf"][1].item() == 0.5
    assert aux["task_ids"].tolist() == [TASK_ID["text_infill"], TASK_ID["image_infill"], -1, -1]
    assert aux["code_masks"].tolist() == [False, True, False, False] and aux["patch_masks"].tolist() == [False, True, False, False]
    assert (aux["patch_images"][0] == DUMMY_PIXEL).all() and aux["target"][0, -1].item() == 7  # truncated target
    assert vl["sample_patch_num"] == 1 and aux["sample_patch_num"] == 0  # round(196·(32/384)²)=1
    assert batch["stats"]["vl"] == {"examples": 2, "padding_rows": 14, "source_truncated": 1, "target_truncated": 0,
                                    "target_tokens": 7}
    assert batch["stats"]["aux"]["target_truncated"] == 1 and batch["stats"]["aux"]["source_truncated"] == 1
    with pytest.raises(ValueError, match="batch size"):
        coll([ex("caption", 4, 3, 32)] * 17)
    with pytest.raises(ValueError, match="expects uint8"):
        coll([ex("caption", 4, 3, 16)])


def test_no_aux_group_means_all_patches():
    cfg = small_cfg(tasks=["caption"])
    batch = Collator(cfg, Composition.from_config(cfg, 2))([ex("caption", 4, 3, 32)])
    assert group_names(batch) == ["vl"] and batch["vl"]["sample_patch_num"] == 0 and batch["vl"]["src_tokens"].shape[0] == 2


def test_constraints_become_masks():
    cfg = small_cfg()
    coll = Collator(cfg, Composition.from_config(cfg, 8), vocab_size=20)
    a = ex("caption", 4, 3, 32)
    a["constraint"] = [[7, 9], [2]]
    b = ex("itm", 4, 3, 32)
    b["constraint"] = {"range": (10, 15)}
    m = coll([a, b, ex("caption", 4, 3, 32)])["vl"]["constraint_masks"].dense()  # compact in the batch
    assert m.shape == (16, 12, 20)
    assert m[0, 0].nonzero().flatten().tolist() == [7, 9] and m[0, 1].nonzero().flatten().tolist() == [2]
    assert m[0, 2].all() and m[2].all()
    assert m[1, 5].nonzero().flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 14]
    assert torch.equal(constraint_mask({"range": (10, 15)}, 12, 20), m[1])


def test_to_model_inputs_normalises_on_device():
    g = {"src_tokens": torch.zeros(1, 3, dtype=torch.long), "prev_output_tokens": torch.zeros(1, 2, dtype=torch.long),
         "patch_images": torch.tensor([0, 255, 128, 64], dtype=torch.uint8).view(1, 1, 2, 2).expand(1, 3, 2, 2),
         "patch_masks": torch.ones(1, dtype=torch.bool), "code_masks": torch.zeros(1, dtype=torch.bool),
         "target": torch.ones(1, 2, dtype=torch.long), "conf": torch.ones(1), "task_ids": torch.zeros(1, dtype=torch.long),
         "sample_patch_num": 0}
    kw = to_model_inputs(g, "cpu", torch.float32)
    assert set(kw) == {"src_tokens", "patch_images", "patch_masks", "prev_output_tokens", "code_masks", "sample_patch_num"}
    expect = (torch.tensor([0, 255, 128, 64]) / 255 - 0.5) / 0.5
    assert torch.equal(kw["patch_images"][0, 0].flatten(), expect) and kw["sample_patch_num"] is None
    assert abs(kw["patch_images"][0, 0, 1, 0].item()) < 0.5 / 255 * 2 + 1e-7  # the grey infill hole ≈ 0
    assert to_model_inputs(g, "cpu", torch.bfloat16)["patch_images"].dtype == torch.bfloat16
    assert set(loss_inputs(g, "cpu")) == {"target", "conf", "task_ids"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_an_image_are_exactly_zero_after_normalisation(dtype):
    """OFA's dummy image is a zero tensor after normalisation (grey), not black (−1): text-only and padding rows
    reach the ResNet's train-mode BatchNorm, so their pixels shift its batch statistics."""
    cfg = small_cfg()
    batch = Collator(cfg, Composition.from_config(cfg, 8))(
        [ex("caption", 4, 3, 32), ex("text_infill", 6, 4), ex("image_infill", 5, 4, 32, code=True)])
    kw = to_model_inputs(batch["aux"], "cpu", dtype)
    aux = kw["patch_images"]
    assert aux.dtype == dtype and batch["aux"]["patch_masks"].tolist() == [False, True, False, False]
    # text-only row 0 and padding rows 2, 3: +0.0 bit for bit; the real image (200) is normalised as before.
    for row in (0, 2, 3):
        assert torch.equal(aux[row], torch.zeros_like(aux[row])) and not torch.signbit(aux[row]).any()
    assert torch.equal(aux[1], torch.full_like(aux[1], (200 / 255 - 0.5) / 0.5))
    vl = to_model_inputs(batch["vl"], "cpu", dtype)["patch_images"]
    assert (vl[1:] == 0).all() and (vl[0] != 0).all()  # padding rows of the image-text group too
    # BatchNorm in train mode sees the same batch statistics as with OFA's float zero dummy images.
    bn = torch.nn.BatchNorm2d(3)
    ofa = torch.zeros(4, 3, 32, 32)
    ofa[1] = (200 / 255 - 0.5) / 0.5
    assert torch.allclose(bn.train()(aux.float()), bn.train()(ofa))


def test_patch_mask_must_match_image_presence():
    cfg = small_cfg()
    coll = Collator(cfg, Composition.from_config(cfg, 8))
    no_image = ex("caption", 4, 3)
    no_image["patch_mask"] = True
    with pytest.raises(ValueError, match="patch_mask must be True exactly when there is an image"):
        coll([no_image])
    unmasked = ex("caption", 4, 3, 32)
    unmasked["patch_mask"] = False
    with pytest.raises(ValueError, match="patch_mask=False but an image"):
        coll([unmasked])


def test_composition_ratios_and_shapes_over_many_batches(tok, neg_dir):
    """Records drawn in the composition's counts → builder → collate: ratios and shapes hold batch after batch."""
    cfg = small_cfg()
    comp = Composition.from_config(cfg, 8)
    builder = ExampleBuilder(cfg, tokenizer=tok, negatives_dir=neg_dir)
    coll = Collator(cfg, comp)
    kinds = [{"type": "caption", "caption": "a red square"},
             {"type": "qa", "question": "how many squares?", "answers": [{"answer": "2", "conf": 1.0}]},
             {"type": "visual_grounding", "caption": "the square", "box": [4, 4, 40, 30]}]
    counts = collections.Counter()
    shapes = set()
    seed = 0
    for step in range(6):
        examples = []
        for source, n in comp.counts.items():
            for _ in range(n):
                seed += 1
                if source == "vl":
                    meta = {"gt_objects": ["square"], "dataset_name": "x", **kinds[seed % 3]}
                    rec = {"source": "vl", "meta": meta, "image": Image.new("RGB", (48, 40), (seed, 9, 9))}
                elif source == "text":
                    rec = {"source": "text", "meta": {"text": f"some text number {seed} with several words in it"}}
                elif source == "image":
                    rec = {"source": "image", "meta": {"codes": [seed] * 256}, "image": Image.new("RGB", (256, 256))}
                else:
                    rec = {"source": "detection", "image": Image.new("RGB", (50, 40)),
                           "meta": {"objects": [{"box": [0, 0, 50, 40], "cat_name": "square"}]}}
                rec.update(seed=seed, key=str(seed))
                examples += builder(rec)
        batch = coll(examples)
        shapes.add(tuple((g, k, tuple(v.shape)) for g in group_names(batch) for k, v in sorted(batch[g].items())
                         if torch.is_tensor(v)))
        for g in group_names(batch):
            counts.update(TASKS[i] for i in batch[g]["task_ids"].tolist() if i >= 0)
            assert batch["stats"][g]["padding_rows"] == 0
    assert len(shapes) == 1
    vl = sum(counts[t] for t in ("caption", "vqa", "grounding", "grounded_caption", "itm"))
    assert (vl, counts["text_infill"], counts["image_infill"], counts["detection"]) == (6 * 16, 12, 6, 6)
    assert counts["grounding"] == counts["grounded_caption"] and counts["itm"] == counts["caption"] + counts["vqa"]

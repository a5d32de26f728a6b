import pickle
import random

import pytest
import torch
from PIL import Image, ImageDraw

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.objectives import ExampleBuilder, ObjectivesConfig
from ofa_scale.objectives.builders import (BuildContext, best_answer, caption_example, detection_example,
                                           encode_prefix, image_infill_example, record_rng, text_infill_example,
                                           vl_image_tensor, vl_row_examples)


def solid(w, h, colour=(90, 140, 200)):
    return Image.new("RGB", (w, h), colour)


BOS, PAD, EOS, YES, NO = 0, 1, 2, 4420, 117
CAPTION_SRC = [0, 99, 473, 5, 2274, 6190, 116, 2]


def vl_meta(**kw):
    meta = {"uniq_id": "x", "source": "vl", "type": "caption", "caption": "", "question": "", "answers": [],
            "box": None, "gt_objects": [], "dataset_name": "coco"}
    meta.update(kw)
    return meta


def test_caption_exact(ctx, tok):
    ex = caption_example(ctx, "A man-riding a horse.", "coco", torch.zeros(3, 384, 384, dtype=torch.uint8))
    words = tok.encode(" a man riding a horse.")
    assert ex["source"] == CAPTION_SRC
    assert ex["target"] == words + [EOS] and ex["prev_output"] == [BOS] + words
    assert (ex["task"], ex["conf"], ex["patch_mask"], ex["code_mask"]) == ("caption", 1.0, True, False)


def test_caption_cc12m_ignores_first_two_targets(ctx, tok):
    ex = caption_example(ctx, "a man riding a horse", "cc12m", None)
    words = tok.encode(" a man riding a horse")
    assert ex["target"] == [PAD, PAD] + words[2:] + [EOS]
    assert ex["prev_output"] == [BOS] + words


def test_vl_image_size_dtype_and_seed(ctx):
    img = Image.effect_noise((500, 375), 60).convert("RGB")
    a, b, c = (vl_image_tensor(ctx, img, s) for s in (1, 1, 2))
    assert a.shape == (3, 384, 384) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vqa_row_exact(ctx, tok):
    meta = vl_meta(type="qa", question="What color is the car?",
                   answers=[{"answer": "blue", "conf": 0.6}, {"answer": "red", "conf": 0.9}])
    main, itm = vl_row_examples(ctx, meta, solid(400, 300), seed=3)
    q = "what color is the car?"
    assert main["source"] == [BOS] + tok.encode(" " + q) + [EOS]
    assert main["target"] == tok.encode(" red") + [EOS] and main["conf"] == 0.9 and main["task"] == "vqa"
    assert itm["task"] == "itm" and itm["conf"] == 0.9 and itm["image"] is main["image"]
    positive = record_rng(3, "itm").random() >= 0.5
    shown = "red" if positive else ctx.negatives.answer("red", 0.9, record_rng(3, "negative"))
    assert itm["source"] == [BOS] + tok.encode(f' what is the answer to question " {q} ". is " {shown} "?') + [EOS]
    assert itm["target"] == [YES if positive else NO, EOS]


def test_best_answer_first_max_wins():
    assert best_answer([{"answer": "a", "conf": 1.0}, {"answer": "b", "conf": 1.0}]) == ("a", 1.0)
    with pytest.raises(UserError):
        best_answer([])


def test_itm_caption_positive_and_negative(ctx, tok, negatives):
    seen = set()
    caption = "A cat on a dog bed"
    for seed in range(40):
        main, itm = vl_row_examples(ctx, vl_meta(caption=caption, gt_objects=["cat", "dog"]), solid(64, 64), seed)
        assert main["source"] == CAPTION_SRC
        if itm["target"] == [YES, EOS]:
            expect = {"a cat on a dog bed"}
        else:
            assert itm["target"] == [NO, EOS]
            # object swap (gt object replaced by a different object.txt entry) or a random corpus caption
            expect = {"a dog on a dog bed", "a zebra on a dog bed", "a cat on a cat bed", "a cat on a zebra bed",
                      "a red car", "two dogs on grass"}
        decoded = [t for t in expect if [BOS] + tok.encode(f' does the image describe " {t} "?') + [EOS] == itm["source"]]
        assert decoded, tok.decode(itm["source"])
        seen.add((itm["target"][0], decoded[0]))
    assert {t for t, _ in seen} == {YES, NO}
    assert len({c for t, c in seen if t == NO}) >= 3  # both negative kinds occur


class FixedRng(random.Random):
    def __init__(self, randoms, indices=()):
        super().__init__(0)
        self.randoms, self.indices = list(randoms), list(indices)

    def random(self):
        return self.randoms.pop(0)

    def randrange(self, n):
        i = self.indices.pop(0)
        assert 0 <= i < n
        return i


def test_negative_answer_rules(negatives):
    # confident "how many" answer and p > 0.5 → ±1 (sign draw < 0.5 → −1)
    assert negatives.answer("3", 1.0, FixedRng([0.7, 0.2])) == "2"
    assert negatives.answer("0", 1.0, FixedRng([0.7, 0.9])) == "1"
    assert negatives.answer("0", 0.9, FixedRng([0.6, 0.1])) == "-1"  # OFA's no-op guard for "0"
    # p <= 0.5: a same-type answer from all but the last; equal to the truth → the last one
    assert negatives.answer("3", 1.0, FixedRng([0.3], [3])) == "4"
    assert negatives.answer("3", 1.0, FixedRng([0.3], [0])) == "0"
    # not confident enough (conf <= p + 0.1) or untyped → "other"
    assert negatives.answer("red", 0.5, FixedRng([0.45], [1])) == "sky"
    assert negatives.answer("tree", 1.0, FixedRng([0.0], [0])) == "road"  # "other" is not in the inverse map
    assert negatives.answer("blue", 1.0, FixedRng([0.0], [0])) == "red"


def test_negative_caption_rules(negatives):
    assert negatives.caption("a cat and a dog", ["cat", "dog"], FixedRng([0.7], [0, 1])) == "a dog and a dog"
    assert negatives.caption("a cat and a dog", ["cat"], FixedRng([0.7], [0, 0])) == "a zebra and a dog"
    assert negatives.caption("a cat", ["cat"], FixedRng([0.6], [1])) == "two dogs on grass"
    assert negatives.caption("a cat", [], FixedRng([0.9], [0])) == "a red car"


def boxed_image(w, h, box, colour=(255, 0, 0)):
    img = solid(w, h, (0, 0, 255))
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
    return img


def test_grounding_and_grounded_caption_exact(ctx, tok):
    # A box covering the whole image ends as the whole 384 crop: bins 0, 0, round(384/512·999)=749, 749.
    meta = vl_meta(type="visual_grounding", caption="The Man", box=[0.0, 0.0, 500.0, 400.0])
    vg, gc = vl_row_examples(ctx, meta, solid(500, 400), seed=1)
    bins = [tok.bin_token(b) for b in (0, 0, 749, 749)]
    assert vg["source"] == [BOS, 61, 976, 473, 5, 2788, 22, 5, 313, 22, 6190, 116, EOS]
    assert vg["target"] == bins + [EOS] and vg["prev_output"] == [BOS] + bins
    assert gc["source"] == [BOS, 1437, 99, 473, 5, 976, 6190, 116, 976, 35] + bins + [EOS]
    assert gc["target"] == tok.encode(" the man") + [EOS] and gc["task"] == "grounded_caption"
    assert gc["image"].shape == (3, 384, 384) and vg["conf"] == gc["conf"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_grounding_box_follows_pixels(ctx, tok, seed):
    box = [300.0, 40.0, 420.0, 160.0]  # near the right edge: ObjectCenterCrop must shift to stay inside
    meta = vl_meta(type="visual_grounding", caption="red", box=box)
    vg, _ = vl_row_examples(ctx, meta, boxed_image(480, 360, box), seed)
    # independent geometry: shorter side s from the documented stream, longer side int(s·480/360) ≥ 384
    s = record_rng(seed, "resize").randint(384, 480)
    ow = int(s * 480 / 360)
    rx, ry = ow / 480, s / 360  # the ratios of the actual resized sides
    cx = 360 * rx  # box centre; the crop is centred there unless that would cross the right edge
    left = ow - 384 if cx + 192 > ow else int(round(cx - 192))
    expect = [300 * rx - left, 40 * ry, 420 * rx - left, 160 * ry]
    got = [tok.bin_index(t) for t in vg["target"][:4]]
    assert got == [min(max(round(c / 512 * 999), 0), 999) for c in expect]
    # and the pixels inside the quantised box are the red square
    x0, y0, x1, y1 = (round(b * 512 / 999) for b in got)
    img = vg["image"]
    inner = img[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2]
    assert inner[0].float().mean() > 240 and inner[2].float().mean() < 15
    assert img[2, :, max(x1 + 3, 0):].float().mean() > 240 if x1 + 3 < 384 else True


def test_image_infill_exact(ctx, tok):
    img = Image.effect_noise((256, 256), 50).convert("RGB")
    codes = [(7 * i) % 8192 for i in range(256)]
    ex = image_infill_example(ctx, img, codes)
    assert ex["source"] == [BOS, 99, 16, 5, 2274, 11, 5, 1692, 233, 116, EOS]
    assert ex["target"] == [50265 + c for c in codes] + [EOS] and ex["prev_output"][1:] == ex["target"][:-1]
    assert ex["code_mask"] and ex["patch_mask"] and ex["conf"] == 2.0
    pixels = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1)
    t = ex["image"]
    assert (t[:, 64:192, 64:192] == 128).all()
    assert torch.equal(t[:, :64], pixels[:, :64]) and torch.equal(t[:, :, 192:], pixels[:, :, 192:])


def test_detection_exact_order_and_degenerate_drop(ctx, tok):
    objects = [{"box": [0, 0, 256, 256], "cat_id": "1", "cat_name": "person"},
               {"box": [10, 10, 10, 50], "cat_id": "2", "cat_name": "pole"},  # zero width: dropped
               {"box": [0, 0, 256, 256], "cat_id": "3", "cat_name": "traffic light"}]
    ex = detection_example(ctx, solid(256, 256), objects, seed=5)
    # whole-image boxes end as the whole 256 crop: 256/512·999 = 499.5 → 500 (half to even, like torch.round)
    bins = [tok.bin_token(b) for b in (0, 0, 500, 500)]
    assert ex["source"] == [BOS, 99, 32, 5, 8720, 11, 5, 2274, 116, EOS]
    assert ex["target"] == bins + tok.encode(" person") + bins + tok.encode(" traffic light") + [EOS]
    assert ex["conf"] == 2.0 and ex["patch_mask"] and not ex["code_mask"] and ex["image"].shape == (3, 256, 256)


@pytest.mark.parametrize("seed", range(6))
def test_detection_boxes_follow_pixels(ctx, tok, seed):
    box = [40, 60, 140, 120]
    ex = detection_example(ctx, boxed_image(300, 200, box), [{"box": box, "cat_id": "1", "cat_name": "red"}], seed)
    tgt = ex["target"]
    if len(tgt) == 1:  # cropped away entirely: only eos
        return
    x0, y0, x1, y1 = (tok.bin_index(t) * 512 / 999 for t in tgt[:4])
    img = ex["image"]
    if x1 - x0 > 6 and y1 - y0 > 6:
        inner = img[:, round(y0) + 2:round(y1) - 2, round(x0) + 2:round(x1) - 2]
        assert inner[0].float().mean() > 240 and inner[2].float().mean() < 15


def test_text_infill_exact_prompt_and_target(ctx, tok):
    text = "  The Quick brown fox, jumps over the lazy dog!  "
    ex = text_infill_example(ctx, text, seed=4)
    ids = tok.encode(" the quick brown fox, jumps over the lazy dog!")
    assert ex["target"] == ids + [EOS] and ex["prev_output"] == [BOS] + ids
    assert ex["source"][:8] == [BOS, 99, 16, 5, 1498, 2788, 9, 22] and ex["source"][-3:] == [22, 116, EOS]
    middle = ex["source"][8:-3]
    assert tok.mask in middle and ex["conf"] == 2.0 and not ex["patch_mask"] and ex["image"] is None
    it = iter(ids)  # the unmasked tokens are an ordered subsequence of the original
    assert all(any(t == u for u in it) for t in middle if t != tok.mask)
    assert len(middle) < len(ids) + 3
    # the splice of separately encoded halves equals OFA's prompt[:-2] / prompt[-2:] split
    full = tok.encode(' what is the complete text of " "?')
    assert ctx.ids(' what is the complete text of "') == full[:-2] and ctx.ids(' "?') == full[-2:]


def test_text_infill_first_512_last_256(ctx, tok):
    text = " ".join(f"word{i}" for i in range(3000))
    ex = text_infill_example(ctx, text, seed=0)
    ids = tok.encode(" " + text)
    assert ex["target"] == ids[:512][-256:] + [EOS]
    assert encode_prefix(tok, " " + text, 512) == ids[:512]
    assert encode_prefix(tok, " short text", 512) == tok.encode(" short text")


def test_builders_with_sentencepiece(spm_tok, negatives):
    ctx = BuildContext(ObjectivesConfig(), spm_tok, negatives)
    t = spm_tok
    cap, itm = vl_row_examples(ctx, vl_meta(caption="a red circle"), solid(400, 400), 0)
    assert cap["source"] == [t.bos] + t.encode(" what does the image describe?") + [t.eos]
    assert cap["target"] == t.encode(" a red circle") + [t.eos] and itm["target"][0] in t.encode(" yes") + t.encode(" no")
    vg, gc = vl_row_examples(ctx, vl_meta(type="visual_grounding", caption="man", box=[0, 0, 400, 400]),
                             solid(400, 400), 0)
    assert vg["target"] == [t.bin_token(b) for b in (0, 0, 749, 749)] + [t.eos]
    text = "red green blue circle square triangle man horse riding " * 3
    ex = text_infill_example(ctx, text, 1)
    assert t.mask in ex["source"] and ex["target"][:-1] == t.encode(" " + text.strip())
    img = image_infill_example(ctx, solid(256, 256), list(range(256)))
    assert img["target"][:3] == [t.code_token(0), t.code_token(1), t.code_token(2)]


def test_scaled_constants_for_small_images(tok, negatives):
    cfg = ObjectivesConfig()
    cfg.vl.image_size, cfg.aux.image_size = 128, 128
    k = cfg.scaled
    assert (k.resize_min, k.resize_max, k.max_side) == (128, 160, 224)
    assert (k.infill_lo, k.infill_hi, k.box_normaliser) == (32, 96, 512 / 3)
    assert k.sample_patch_num == 22  # 196 of 576 patches → the same fraction of 64
    assert ObjectivesConfig().scaled.sample_patch_num == 196
    ctx = BuildContext(cfg, tok, negatives)
    vg, _ = vl_row_examples(ctx, vl_meta(type="visual_grounding", caption="x", box=[0, 0, 300, 200]), solid(300, 200), 0)
    # the whole 128 crop spans the same bins as OFA's whole 384 crop
    assert [tok.bin_index(b) for b in vg["target"][:4]] == [0, 0, 749, 749] and vg["image"].shape == (3, 128, 128)
    ex = image_infill_example(ctx, solid(256, 256, (10, 10, 10)), [0] * 256)
    assert ex["image"].shape == (3, 128, 128) and (ex["image"][:, 32:96, 32:96] == 128).all()
    assert (ex["image"][:, :32] == 10).all()


def records():
    return [
        {"source": "vl", "key": "a", "seed": 11, "image": solid(320, 240), "meta": vl_meta(caption="a dog")},
        {"source": "vl", "key": "b", "seed": 12, "image": solid(320, 240),
         "meta": vl_meta(type="qa", question="how many dogs?", answers=[{"answer": "2", "conf": 1.0}])},
        {"source": "vl", "key": "c", "seed": 13, "image": solid(320, 240),
         "meta": vl_meta(type="visual_grounding", caption="dog", box=[10, 10, 100, 100])},
        {"source": "text", "key": "d", "seed": 14, "image": None, "meta": {"text": "one two three four five six"}},
        {"source": "image", "key": "e", "seed": 15, "image": solid(256, 256), "meta": {"codes": list(range(256))}},
        {"source": "detection", "key": "f", "seed": 16, "image": solid(300, 300),
         "meta": {"objects": [{"box": [0, 0, 300, 300], "cat_id": "1", "cat_name": "dog"}]}},
    ]


def test_example_builder_dispatch_pickle_and_determinism(bpe_dir, neg_dir):
    builder = ExampleBuilder(ObjectivesConfig(), "gpt2-bpe", bpe_dir, neg_dir)
    clone = pickle.loads(pickle.dumps(builder))
    assert clone._tokenizer is None and clone._negatives is None  # reloaded lazily in the worker
    tasks = [[e["task"] for e in builder(r)] for r in records()]
    assert tasks == [["caption", "itm"], ["vqa", "itm"], ["grounding", "grounded_caption"], ["text_infill"],
                     ["image_infill"], ["detection"]]
    for r in records():
        for a, b in zip(builder(r), clone(r)):
            assert a["source"] == b["source"] and a["target"] == b["target"]
            assert (a["image"] is None and b["image"] is None) or torch.equal(a["image"], b["image"])


def test_disabled_tasks_produce_nothing(tok):
    cfg = ObjectivesConfig(tasks=["caption", "grounded_caption", "detection"])
    builder = ExampleBuilder(cfg, tokenizer=tok)  # no negatives needed without itm
    tasks = [[e["task"] for e in builder(r)] for r in records()]
    assert tasks == [["caption"], [], ["grounded_caption"], [], [], ["detection"]]


def test_builder_config_errors(tok):
    with pytest.raises(ConfigError, match="negative"):
        ExampleBuilder(ObjectivesConfig(), tokenizer=tok)
    with pytest.raises(ConfigError, match="unknown task"):
        ExampleBuilder(ObjectivesConfig(tasks=["captioning"]), tokenizer=tok)
    with pytest.raises(UserError, match="source"):
        ExampleBuilder(ObjectivesConfig(tasks=["caption"]), tokenizer=tok)({"source": "audio", "meta": {}})

"""`task.language: zh` (issue 13 §1): OFA-CN's Chinese prompts in the caption and refcoco tasks, the caption token
budget and character-level scoring. Expected ids are spec §10.1.2's verified encodings, over a vocab.txt that puts
BERT-CN's pieces at their real ids (tests/data/test_tokenizer_bert.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.errors import ConfigError
from ofa_scale.finetune.config import TaskSection
from ofa_scale.finetune.prompts_cn import CAPTION_PROMPT_ZH, GROUNDING_PROMPT_ZH, OCR_PROMPT_ZH, SUMMARY_PROMPT_ZH
from ofa_scale.finetune.task import make_task
from ofa_scale.utils.config import from_dict
from tests.data.test_tokenizer_bert import SPEC_EXAMPLES, spec_sized_vocab, write_vocab

BOS, EOS = 0, 2
CAPTION_IDS, OCR_IDS, GROUNDING_IDS, CAPTION_TARGET_IDS = (ids for _, ids in SPEC_EXAMPLES[:4])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("bert", write_vocab(tmp_path_factory.mktemp("bert_cn"), spec_sized_vocab()))


def _task(tok, name, **fields):
    cfg = TaskSection(name=name, language="zh", image_size=32, **fields)
    cfg.validate()
    return make_task(cfg, tok)


def _record(**meta):
    return {"key": "k", "meta": {"uniq_id": "u1", "image_id": "7", **meta}, "image": Image.new("RGB", (40, 30))}


def test_prompt_strings_are_ofa_cns():
    assert (CAPTION_PROMPT_ZH, OCR_PROMPT_ZH) == ("图片描述了什么内容?", "图片上的文字是什么?")
    assert GROUNDING_PROMPT_ZH.format("穿白衬衫的女人") == '这段文字" 穿白衬衫的女人 "描述的是哪个区域？'
    assert SUMMARY_PROMPT_ZH.format("文章") == "文章 请用一个句子简单总结上文："


def test_caption_source_target_and_budget(tok):
    task = _task(tok, "caption", max_tgt_length=6)
    [ex] = task.train_examples(_record(captions=["一个男人在骑自行车"]))
    assert ex["source"] == [BOS, *CAPTION_IDS, EOS]
    # the caption is one whitespace word, so OFA's word cut keeps it whole; the zh budget cuts at 6 BERT tokens
    assert ex["target"] == CAPTION_TARGET_IDS[:6] + [EOS] and ex["prev_output"] == [BOS] + CAPTION_TARGET_IDS[:6]
    assert task.lengths() == (len(CAPTION_IDS) + 2, 7)
    assert ex["references"] == ["一 个 男 人 在 骑 自 行 车"]  # SCST's CIDEr-D reward counts characters


def test_caption_scores_characters_without_meteor(tok):
    task = _task(tok, "caption")
    items = [task.eval_item(_record(captions=["一个男人在骑自行车", "男人骑车"]))]
    # a BERT-decoded prediction (spaces between characters) matches the unspaced reference exactly
    perfect = task.score([{"id": 7, "caption": "一 个 男 人 在 骑 自 行 车"}], items, final=True)
    assert set(perfect) == {"cider", "bleu4", "rouge_l"} and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["bleu4"] == pytest.approx(1.0)
    partial = task.score([{"id": 7, "caption": "一 个 女 人"}], items)
    assert 0.0 < partial["rouge_l"] < 1.0


def test_refcoco_source_is_the_chinese_grounding_prompt(tok):
    task = _task(tok, "refcoco")
    [ex] = task.train_examples(_record(text="穿白衬衫的女人", box=[0.0, 0.0, 20.0, 15.0]))
    assert ex["source"] == [BOS, *GROUNDING_IDS, EOS]
    # the box is untouched by the language: 20 px of 40 (and 15 of 30) -> 16 of 32 -> round(16 / 512 * 999) = 31
    assert ex["target"] == [tok.bin_token(0), tok.bin_token(0), tok.bin_token(31), tok.bin_token(31), EOS]


def test_language_needs_the_bert_tokenizer(bpe_dir):
    with pytest.raises(ConfigError, match="data.tokenizer.kind=bert"):
        _task(load_tokenizer("gpt2-bpe", bpe_dir), "caption")
    with pytest.raises(ConfigError, match="language"):
        from_dict(TaskSection, {"name": "caption", "language": "fr"})
    with pytest.raises(ConfigError, match="scst"):
        TaskSection(name="caption", language="zh", criterion="scst").validate()

"""OFA-CN's Chinese prompts (spec §10.1.4) and the few places Chinese text is handled differently from English.

OFA picks the prompt by the BPE class (`BertBPE` → Chinese); here `task.language: zh` picks it, and requires the
`bert` tokenizer. The strings are verbatim: ASCII `?` in the caption and OCR prompts, ASCII quotes with inner
spaces and a full-width `？` in the grounding prompt, the article *before* the summary instruction.

Chinese has no spaces between words, so OFA's word limits never cut it (spec §10.1.5). Captions therefore count
their target budget in BERT tokens (`task.max_tgt_length`), and caption scoring compares BERT-decoded text, one
character per word, as OFA-CN's decoded predictions are (`spaced`).
"""

from __future__ import annotations

from typing import Any

from ofa_scale.errors import ConfigError
from ofa_scale.evaluation.metrics.caption_text import strip_punctuation
from ofa_scale.objectives.builders import CAPTION_PROMPT, GROUNDING_PROMPT

LANGUAGES = ("en", "zh")

CAPTION_PROMPT_ZH = "图片描述了什么内容?"
GROUNDING_PROMPT_ZH = '这段文字" {} "描述的是哪个区域？'
OCR_PROMPT_ZH = "图片上的文字是什么?"
SUMMARY_PROMPT_ZH = "{} 请用一个句子简单总结上文："

_PROMPTS = {
    "caption": {"en": CAPTION_PROMPT, "zh": CAPTION_PROMPT_ZH},
    "refcoco": {"en": GROUNDING_PROMPT, "zh": GROUNDING_PROMPT_ZH},
    "ocr": {"en": " what are the texts on the image?", "zh": OCR_PROMPT_ZH},  # OFA-OCR (finetune/ocr.py)
}


def task_prompt(task: str, language: str, tokenizer: Any) -> str:
    """The prompt (a format string for refcoco) of `task` in `language`; zh needs the bert tokenizer."""
    if language not in LANGUAGES:
        raise ConfigError(f"task.language is {language!r}; use one of {', '.join(LANGUAGES)}")
    if language == "zh" and getattr(tokenizer, "kind", None) != "bert":
        raise ConfigError(f"task.language=zh uses OFA-CN's Chinese prompts, which OFA-CN encodes with BERT's "
                          f"WordPiece; set data.tokenizer.kind=bert and data.tokenizer.path to the directory "
                          f"holding its vocab.txt (tokenizer kind is {getattr(tokenizer, 'kind', None)!r})")
    return _PROMPTS[task][language]


def spaced(tokenizer: Any, text: str) -> str:
    """`text` as OFA-CN writes a prediction: BERT-normalised and decoded (a space between CJK characters,
    lower case), ASCII punctuation deleted (OFA's eval_caption), whitespace collapsed."""
    return " ".join(strip_punctuation(tokenizer.decode(tokenizer.encode(text))).split())


__all__ = ["CAPTION_PROMPT_ZH", "GROUNDING_PROMPT_ZH", "LANGUAGES", "OCR_PROMPT_ZH", "SUMMARY_PROMPT_ZH", "spaced",
           "task_prompt"]

"""Shared by the text-to-image task tests: a small SentencePiece tokenizer with OFA's 8192 code tokens (the GPT-2
vocabulary's 59k-row logits over 1025 target positions would dominate a CPU test), a tiny OFA with the 32×32
code grid, and the task over the sample corpus' colour quantiser."""

from __future__ import annotations

from pathlib import Path

import torch

from ofa_scale.data.sample_image_gen import TEMPLATES
from ofa_scale.data.sample_corpus import COLOURS, SHAPES
from ofa_scale.finetune.config import DecodingSection, TaskSection
from ofa_scale.finetune.task import make_task
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.predict.image_gen import PROMPT

TINY = dict(d_model=64, ffn_dim=128, heads=2, encoder_layers=2, decoder_layers=2, code_image_size=256,
            attention_impl="math", dropout=0.0)


def train_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    """A BPE of `vocab_size` pieces over every caption the sample world can write, the prompt, 8192 codes and 2 bins.
    300 is 4 specials, 256 byte pieces and ~40 merges (mostly characters: small and fast); 400 gives every word of
    the prompt and the captions its own piece."""
    from ofa_scale.cli.preprocess import main as preprocess

    lines = [t.format(a=a, c=c, k=k) for t in TEMPLATES for c in COLOURS for k in SHAPES for a in ("a", "an")]
    lines += [PROMPT.format("")] * 20
    text = out / "captions.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n".join(lines) + "\n")
    assert preprocess(["train-tokenizer", "--input", f"lines:{text}", "--vocab-size", str(vocab_size),
                       "--soft-vocab-limit",
                       "--model-type", "bpe", "--num-codes", "8192", "--num-bins", "2", "--out",
                       str(out / "tokenizer")]) == 0
    return out / "tokenizer"


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> OFAModel:
    torch.manual_seed(seed)
    return OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=vocab_size, **{**TINY, **overrides})).eval()


def image_gen_task(tok, *, samples: int = 3, criterion: str = "ce", **fields):
    cfg = dict(name="image_gen", criterion=criterion, image_size=16, max_src_length=64, max_tgt_length=1024,
               vqgan="colour", decoding=DecodingSection(beam=samples, sampling_topk=256, batch_size=2),
               scst=DecodingSection(beam=samples, sampling_topk=256))
    cfg.update(fields)
    return make_task(TaskSection(**cfg), tok)

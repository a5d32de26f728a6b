"""The `task:` section of the training config: what a finetuning recipe trains and how it is validated.

An empty `task.name` is OFA multitask pretraining (data.root, objectives.*). A named task is a finetuning recipe
(spec §7): it reads `data.train` / `data.valid` shard directories written by `ofa-preprocess shards --format
<task.format>`, builds examples with its task module (ofa_scale/finetune/<task>.py), validates with the task's
decoding preset and metric, and keeps the best checkpoint by `task.best_metric`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ofa_scale.errors import ConfigError

FINETUNE_TASKS = ("caption", "vqa", "refcoco", "snli_ve", "ocr", "gigaword", "glue_cola", "glue_sst2", "glue_mrpc",
                  "glue_qqp", "glue_mnli", "glue_rte", "glue_qnli", "image_gen", "imagenet")
PromptType = Literal["none", "src", "prev_output"]


@dataclass
class DecodingSection:
    """OFA's --eval-args / --scst-args (spec §7); `inference: allcand` scores every candidate instead (§6.3)."""

    inference: Literal["beam", "allcand"] = "beam"
    beam: int = 5
    max_len_a: float = 0.0
    max_len_b: int = 16
    min_len: int = 1
    no_repeat_ngram_size: int = 0
    unnormalized: bool = False
    lenpen: float = 1.0
    batch_size: int = 8  # evaluation samples per forward (OFA's valid_batch_size)
    candidate_chunk: int = 4096  # all-candidate scoring: decoder rows (shared answer prefixes) per batched pass
    # image_gen samples (OFA's sampling_topk / temperature; `beam` = samples per caption)
    sampling_topk: int = 256
    temperature: float = 1.0

    def validate(self, where: str) -> None:
        if self.beam < 1 or self.batch_size < 1 or self.candidate_chunk < 1:
            raise ConfigError(f"{where}.beam, batch_size and candidate_chunk must be >= 1")
        if self.min_len < 0 or self.max_len_b < 0 or self.max_len_a < 0:
            raise ConfigError(f"{where}.min_len, max_len_a and max_len_b must be >= 0")
        if self.sampling_topk < 0 or self.temperature <= 0:
            raise ConfigError(f"{where}.sampling_topk must be >= 0 (0 = the whole vocabulary) and "
                              f"{where}.temperature > 0")


@dataclass
class TaskSection:
    name: str = ""  # "" = pretraining; else one of FINETUNE_TASKS
    criterion: Literal["ce", "scst"] = "ce"  # scst: caption stage 2 (CIDEr, spec §6.2); image_gen stage 2 (CLIP)
    prompt_type: PromptType = "none"  # decoder prompt (spec §7.2): none | src | prev_output
    # zh: OFA-CN's Chinese prompts (finetune/prompts_cn.py, spec §10.1.4; needs data.tokenizer.kind=bert); for
    # caption, max_tgt_length then counts BERT tokens (Chinese has no spaces between words)
    language: Literal["en", "zh"] = "en"
    image_size: int = 480  # Resize((S, S)) bicubic; RefCOCO: 512
    max_src_length: int = 80  # words (pre_caption / pre_question)
    max_tgt_length: int = 20  # caption: words; vqa: answer tokens (30)
    max_object_length: int = 30  # vqa `object:` tags kept
    add_object: bool = False  # vqa: append " object: ..." to the question
    add_caption: bool = True  # snli_ve: premise-and-hypothesis prompt
    answers: Optional[str] = None  # vqa: candidate answer file (one per line, `ofa-preprocess vqa-answers`)
    class_names: Optional[str] = None  # imagenet: synset_words-style class-name file (finetune/imagenet.py)
    constrained_training: bool = True  # vqa / snli_ve: trie-constrained loss and label smoothing
    box_normaliser: float = 512.0  # refcoco: max_image_size (bins span [0, normaliser] input pixels)
    cider_df: Optional[str] = None  # caption: cached CIDEr-D document frequencies (`ofa-eval cider-df`)
    valid_interval: int = 500  # validate every N updates (and at each epoch end); 0 = epoch ends only
    valid_limit: int = 0  # validation samples (0 = the whole valid set)
    # share of data.valid read by validation during training (evenly spaced records; OFA's ImageNet validates on
    # a subset); `ofa-eval run` reads every record
    valid_fraction: float = 1.0
    best_metric: str = ""  # default: the task's main metric
    decoding: DecodingSection = field(default_factory=DecodingSection)
    scst: DecodingSection = field(default_factory=lambda: DecodingSection(beam=5, max_len_b=16,
                                                                          no_repeat_ngram_size=3))
    # image_gen (finetune/image_gen.py): codes -> pixels (a taming VQGAN dir, or `colour`: the sample quantiser),
    # CLIP ranking / CLIP-SCST reward (a local open-clip weights file), FID/IS (Inception weights, reference stats)
    vqgan: Optional[str] = None
    clip_weights: Optional[str] = None
    clip_arch: str = "ViT-B-16"
    inception_weights: Optional[str] = None
    fid_reference: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific knobs (documented by the task module)
    # `ofa-eval run`'s MuE early exit when no --early-exit is given (model/early_exit.py syntax, e.g.
    # "img=0.99,txt=0.7,decoder=0.9"); training and its validation never exit (MuE validates the full model)
    early_exit: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return bool(self.name)

    def validate(self) -> None:
        if not self.name:
            return
        if self.name not in FINETUNE_TASKS:
            raise ConfigError(f"task.name is {self.name!r}; use one of {', '.join(FINETUNE_TASKS)} (or leave it "
                              f"empty for pretraining)")
        if self.criterion == "scst" and self.name not in ("caption", "image_gen"):
            raise ConfigError(f"task.criterion=scst is caption and image_gen stage 2 (CIDEr / CLIP rewards); task "
                              f"{self.name} trains with criterion=ce")
        if self.criterion == "scst" and self.language == "zh":  # OFA-CN ships stage 1 (MUGE) only
            raise ConfigError("task.criterion=scst is not available with task.language=zh: OFA-CN has no caption "
                              "stage 2, and the CIDEr-D document frequencies would count unspaced Chinese")
        if self.image_size < 16 or self.image_size % 16:
            raise ConfigError(f"task.image_size is {self.image_size}; use a positive multiple of 16")
        if self.max_src_length < 1 or self.max_tgt_length < 1 or self.max_object_length < 0:
            raise ConfigError("task.max_src_length and task.max_tgt_length must be >= 1")
        if self.valid_interval < 0 or self.valid_limit < 0:
            raise ConfigError("task.valid_interval and task.valid_limit must be >= 0")
        if not 0.0 < self.valid_fraction <= 1.0:
            raise ConfigError(f"task.valid_fraction is {self.valid_fraction}; use a fraction in (0, 1]")
        self.decoding.validate("task.decoding")
        self.scst.validate("task.scst")
        if self.early_exit not in (None, "off"):
            from ofa_scale.model.early_exit import EarlyExitConfig

            EarlyExitConfig.parse(self.early_exit)

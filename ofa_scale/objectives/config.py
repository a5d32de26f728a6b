"""The `objectives:` section of the training config: which tasks run, their mix, shapes and loss settings.

Defaults are OFA's pretraining values (spec §2 and §8). Pixel constants of OFA are tied to its image sizes
(384 px for image-text rows, 256 px for the auxiliary group); when a smaller size is configured (the demo runs
128 px on CPU) they are scaled proportionally — see `ScaledConstants` and docs/objectives.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ofa_scale.errors import ConfigError

# Task names, in the order of `task_ids` (docs/interfaces.md §4). Never reorder: ids are logged and checkpointed.
TASKS: tuple[str, ...] = ("caption", "vqa", "grounding", "grounded_caption", "itm", "detection",
                          "image_infill", "text_infill")
TASK_ID = {name: i for i, name in enumerate(TASKS)}
PAD_TASK_ID = -1  # task id of a padding row in a fixed-shape group batch

# Which record source feeds which task, and which batch group each task's examples go to.
SOURCE_TASKS: dict[str, tuple[str, ...]] = {
    "vl": ("caption", "vqa", "grounding", "grounded_caption", "itm"),
    "text": ("text_infill",),
    "image": ("image_infill",),
    "detection": ("detection",),
}
SOURCES: tuple[str, ...] = tuple(SOURCE_TASKS)
GROUPS: tuple[str, ...] = ("vl", "aux")
TASK_GROUP: dict[str, str] = {t: ("vl" if s == "vl" else "aux") for s, ts in SOURCE_TASKS.items() for t in ts}

LOSSES = ("ce", "encouraging")  # objectives.loss

# OFA's reference sizes: every pixel constant of spec §2.1 is stated for these.
OFA_VL_IMAGE_SIZE = 384
OFA_AUX_IMAGE_SIZE = 256


@dataclass
class GroupShape:
    """Fixed shapes of one batch group (the batch size comes from the composition, not from here)."""

    image_size: int
    source_length: int  # tokens incl. bos/eos; longer sources are truncated (and counted)
    target_length: int  # decoder positions; longer targets are truncated (and counted)


@dataclass
class VLShape(GroupShape):
    # ITM sources hold a caption of up to 80 words inside a prompt (~110 tokens); caption targets are 30 words.
    image_size: int = OFA_VL_IMAGE_SIZE
    source_length: int = 128
    target_length: int = 40


@dataclass
class AuxShape(GroupShape):
    # Text infilling: 7 prompt + ≤256 text (+ a few inserted masks) + 2 prompt + bos/eos ≤ 272 in practice;
    # targets of text/image infilling are 257 tokens, detection ~5 per object.
    image_size: int = OFA_AUX_IMAGE_SIZE
    source_length: int = 272
    target_length: int = 264


def _default_mix() -> dict[str, int]:
    return {"vl": 8, "text": 2, "image": 1, "detection": 1}


@dataclass
class ObjectivesConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # enabled tasks; others produce no examples
    # Records per source in proportion: per 8 image-text rows, 2 text, 1 image-infilling, 1 detection (OFA §2.4).
    mix: dict[str, int] = field(default_factory=_default_mix)
    vl: VLShape = field(default_factory=VLShape)
    aux: AuxShape = field(default_factory=AuxShape)

    max_src_words: int = 80  # pre_caption/pre_question word limits (OFA max_src_length / max_tgt_length)
    max_tgt_words: int = 30
    text_read_tokens: int = 512  # text infilling: first 512 BPE tokens, then ...
    text_keep_tokens: int = 256  # ... the last 256 of those
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    num_bins: int = 1000
    max_image_size: int = 512  # box normaliser at the reference vl size (scaled with vl.image_size)
    sample_patch_num: int = 196  # patches kept on the vl group at the reference size (scaled); 0 keeps all
    random_augment: bool = True  # RandomAugment(2, 7) on caption / qa images
    augment_ops: int = 2
    augment_magnitude: int = 7
    itm_positive_prob: float = 0.5  # OFA: coin >= 0.5 gives the positive ITM example
    uni_modal_conf: float = 2.0  # loss weight of text/image-infilling and detection examples

    label_smoothing: float = 0.0
    # per_group: Σ_g loss_g / tokens_g over the global batch (OFA's v1/v2 balance); global_tokens: one mean over all
    # target tokens. Both are independent of DP size and micro-batching; see docs/objectives.md.
    loss_normalization: Literal["per_group", "global_tokens"] = "per_group"
    drop_worst_ratio: float = 0.0
    drop_worst_after: int = 0
    # encouraging: OFA's Encouraging Loss (spec §10.4), a bonus on top of the label-smoothed cross entropy whose
    # b(p) = log(1 − p) is replaced above p = log_end by its tangent (1 = no tangent); objectives/token_loss.py
    loss: Literal["ce", "encouraging"] = "ce"
    log_end: float = 0.75

    def __post_init__(self) -> None:
        # A YAML `mix:` naming only some sources keeps OFA's ratio for the others (set 0 to turn one off).
        self.mix = {**_default_mix(), **dict(self.mix)}

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"objectives.tasks has unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
        if not self.tasks:
            raise ConfigError("objectives.tasks is empty; enable at least one of " + ", ".join(TASKS))
        bad = [s for s in self.mix if s not in SOURCES]
        if bad:
            raise ConfigError(f"objectives.mix has unknown source(s) {bad}; use {', '.join(SOURCES)}")
        for s, r in self.mix.items():
            if r < 0:
                raise ConfigError(f"objectives.mix.{s} is {r}; ratios must be >= 0")
        if self.mix.get("vl", 0) <= 0:
            raise ConfigError("objectives.mix.vl must be > 0: the mix is counted per image-text row "
                              "(set e.g. vl: 8, text: 2, image: 1, detection: 1)")
        for name in ("vl", "aux"):
            g: GroupShape = getattr(self, name)
            if g.image_size < 16 or g.image_size % 16:
                raise ConfigError(f"objectives.{name}.image_size is {g.image_size}; use a positive multiple of "
                                  f"16 (the ResNet stem downsamples by 16)")
            if g.source_length < 4 or g.target_length < 2:
                raise ConfigError(f"objectives.{name}.source_length/target_length are too small "
                                  f"({g.source_length}/{g.target_length}); use at least 4 and 2")
        if self.aux.image_size % 4:
            raise ConfigError(f"objectives.aux.image_size {self.aux.image_size} must be a multiple of 4 so the "
                              f"image-infilling centre square is whole pixels")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objectives.mask_ratio is {self.mask_ratio}; use a fraction in (0, 1)")
        if self.poisson_lambda <= 0:
            raise ConfigError(f"objectives.poisson_lambda is {self.poisson_lambda}; use a positive number")
        if not 0 < self.text_keep_tokens <= self.text_read_tokens:
            raise ConfigError("objectives.text_keep_tokens must be in (0, text_read_tokens]")
        if self.num_bins < 2 or self.max_image_size <= 0 or self.sample_patch_num < 0:
            raise ConfigError("objectives.num_bins must be >= 2, max_image_size > 0 and sample_patch_num >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"objectives.label_smoothing is {self.label_smoothing}; use a value in [0, 1)")
        if not 0.0 <= self.drop_worst_ratio < 1.0:
            raise ConfigError(f"objectives.drop_worst_ratio is {self.drop_worst_ratio}; use a value in [0, 1)")
        if self.loss not in LOSSES:
            raise ConfigError(f"objectives.loss is {self.loss!r}; use one of {', '.join(LOSSES)}")
        if not 0.0 < self.log_end <= 1.0:
            raise ConfigError(f"objectives.log_end is {self.log_end}; the Encouraging Loss needs a probability in "
                              f"(0, 1] (OFA: 0.75; try 0.5 or 0.75 first)")
        if not 0.0 <= self.itm_positive_prob <= 1.0:
            raise ConfigError("objectives.itm_positive_prob must be a probability in [0, 1]")
        if self.augment_ops < 0 or not 0 <= self.augment_magnitude <= 10:
            raise ConfigError("objectives.augment_ops must be >= 0 and augment_magnitude in 0..10")

    @property
    def encouraging_log_end(self) -> float | None:
        """The token loss's `log_end`: set with objectives.loss=encouraging, None for plain cross entropy."""
        return self.log_end if self.loss == "encouraging" else None

    def enabled(self, task: str) -> bool:
        return task in self.tasks

    def drop_worst_ratio_at(self, update_num: int) -> float:
        """OFA applies drop-worst only once `update_num > drop_worst_after`."""
        return self.drop_worst_ratio if update_num > self.drop_worst_after else 0.0

    def decode_min_sizes(self) -> dict[str, int]:
        """`loader.decode_min_size`: the smallest shorter side each image source may be draft-decoded to without
        any transform upsampling — vl: the largest random-resize size; detection: the largest jitter size
        (1.5 × aux); image infilling: the aux size."""
        k = self.scaled
        return {"vl": k.resize_max, "detection": math.ceil(1.5 * self.aux.image_size), "image": self.aux.image_size}

    @property
    def scaled(self) -> "ScaledConstants":
        return ScaledConstants.of(self)


@dataclass(frozen=True)
class ScaledConstants:
    """OFA's pixel constants at the configured image sizes.

    Rule: a constant tied to the 384-px image-text size is multiplied by s_vl = vl.image_size / 384; one tied
    to the 256-px auxiliary size by s_aux = aux.image_size / 256; patch counts scale with s_vl². The box
    normaliser scales with s_vl for *all* box tasks, so one bin means the same number of input pixels in
    grounding and detection (as in OFA, where both divide by 512). At the default sizes every value is OFA's.
    """

    resize_min: int  # random shorter side, inclusive range (OFA 384..480)
    resize_max: int
    max_side: int  # each side clipped to this (OFA 672)
    translate_px: float  # RandomAugment translate at magnitude 10 (OFA 10 px → 7 px at M=7)
    box_normaliser: float  # pixel / this → [0, 1) (OFA 512)
    infill_lo: int  # image infilling: centre square [lo, hi) (OFA [64, 192) at 256 px)
    infill_hi: int
    sample_patch_num: int  # vl patches kept when an aux group is present (OFA 196 of 576)

    @classmethod
    def of(cls, cfg: ObjectivesConfig) -> "ScaledConstants":
        s_vl = cfg.vl.image_size / OFA_VL_IMAGE_SIZE
        a = cfg.aux.image_size
        patches = (cfg.vl.image_size // 16) ** 2
        spn = min(patches, max(1, round(cfg.sample_patch_num * s_vl * s_vl))) if cfg.sample_patch_num else 0
        return cls(
            resize_min=cfg.vl.image_size,
            resize_max=max(cfg.vl.image_size, round(480 * s_vl)),
            max_side=max(cfg.vl.image_size, round(672 * s_vl)),
            translate_px=10.0 * s_vl,
            box_normaliser=cfg.max_image_size * s_vl,
            infill_lo=a // 4,
            infill_hi=3 * a // 4,
            sample_patch_num=spn,
        )

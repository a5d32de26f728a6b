"""Build the encoder's image stem that `model.image_stem` names: OFA's truncated ResNet (spec §4.2) or OFA-OCR's
ViT-B/16 (spec-ext §10.2.4). Both map (B, 3, H, W) to a stride-16 feature map of `cfg.image_channels` channels and
live at `encoder.embed_images`, so everything after the stem (image_proj, patch positions) is shared."""

from __future__ import annotations

from torch import nn

from ofa_scale.model.config import OFAConfig
from ofa_scale.model.resnet import ResNetStem
from ofa_scale.model.vit_stem import ViTStem


def build_image_stem(cfg: OFAConfig) -> nn.Module:
    if cfg.image_stem == "vit_b16":
        return ViTStem()
    return ResNetStem(cfg.resnet_blocks, cfg.resnet_drop_path_rate)


__all__ = ["build_image_stem"]

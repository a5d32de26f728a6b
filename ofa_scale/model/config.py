"""OFAConfig: every hyper-parameter of the OFA architecture (spec §4.1) as one typed dataclass, plus presets.

Defaults follow what the released checkpoints and every OFA script use (`--scale-attn --scale-fc --scale-heads`,
pre-LN, all embedding layer norms, type embedding, shared embeddings, positions only as attention biases), so
`OFAConfig.preset(name)` builds the model whose parameter count the spec lists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ofa_scale.errors import ConfigError

# Bottleneck blocks per ResNet stage 1/2/3 (stage 4 is never built: the stem stops after layer3).
RESNET_BLOCKS: dict[str, tuple[int, int, int]] = {
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}

ResNetName = Literal["resnet50", "resnet101", "resnet152"]
# image stems (spec §4.2 ResNet; spec-ext §10.2.4 OFA-OCR's ViT-B/16, whose features have 768 channels)
ImageStem = Literal["resnet", "vit_b16"]
IMAGE_STEMS = ("resnet", "vit_b16")
VIT_B16_CHANNELS = 768
AttentionImpl = Literal["math", "sdpa"]


@dataclass
class OFAConfig:
    arch: str = "custom"
    # transformer shape
    d_model: int = 768
    ffn_dim: int = 3072
    heads: int = 12
    encoder_layers: int = 6
    decoder_layers: int = 6
    # vocabulary: GPT-2 BPE (50,260) + 4 specials + <mask> + 8192 codes + 1000 bins (spec §3)
    vocab_size: int = 59457
    pad_token_id: int = 1
    # image stem
    image_stem: ImageStem = "resnet"  # "vit_b16": OFA-OCR's ViT stem replaces the ResNet (model/vit_stem.py)
    resnet: ResNetName = "resnet101"  # depth when image_stem is "resnet"
    resnet_out_channels: int = 1024  # layer3 of a Bottleneck ResNet, stride 16
    # positions
    max_source_positions: int = 1024
    max_target_positions: int = 1024
    token_bucket_size: int = 256
    image_bucket_size: int = 42
    code_image_size: int = 128  # decoder code grid is code_image_size // 8 per side
    attn_scale_factor: float = 2.0  # logits scaled by (head_dim * factor)^-0.5
    # NormFormer-style extras (off in OFA's preset defaults, on in every script and released checkpoint)
    scale_attn: bool = True  # attn_ln / self_attn_ln / cross_attn_ln
    scale_fc: bool = True  # ffn_layernorm
    scale_heads: bool = True  # c_attn
    # regularisation (preset defaults 0; OFA scripts pass dropout 0.1 and drop-path 0.1/0.2)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path_rate: float = 0.0
    decoder_drop_path_rate: float = 0.0
    resnet_drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02  # fairseq init_bert_params
    # kernels
    attention_impl: AttentionImpl = "sdpa"
    # prompt tuning (spec-ext §10.3; ofa_scale/model/prompt_tuning.py): parameters added to the base model, 0 = off.
    # Set from the training config's model.prompt_tuning section, not by hand.
    encoder_prompt_length: int = 0  # prefix key/value pairs in every encoder self-attention
    decoder_prompt_length: int = 0  # ... in every decoder self-attention (cross-attention never gets one)
    prompt_dropout: float = 0.2  # on the prefix key/values (OFA hard-codes 0.2)
    adapter_dim: int = 0  # bottleneck adapter after every layer's FFN, of this width
    # MuE (spec-ext §10.7; model/mue_encoder.py): image and text run through the encoder layers as separate streams,
    # and finetuning sums the loss over every decoder layer (objectives/mue_loss.py). No parameters: OFA's state dict.
    mue: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def resnet_blocks(self) -> tuple[int, int, int]:
        return RESNET_BLOCKS[self.resnet]

    @property
    def image_channels(self) -> int:
        """Channels of the stem's feature map, i.e. image_proj's input width."""
        return VIT_B16_CHANNELS if self.image_stem == "vit_b16" else self.resnet_out_channels

    @property
    def code_grid_size(self) -> int:
        return self.code_image_size // 8

    @property
    def num_token_rel_buckets(self) -> int:
        return 2 * self.token_bucket_size - 1  # 511

    @property
    def num_image_rel_buckets(self) -> int:
        return (2 * self.image_bucket_size - 1) ** 2 + 3  # 6892

    @property
    def num_image_positions(self) -> int:
        return self.image_bucket_size**2 + 1  # 1765

    def validate(self) -> None:
        if self.d_model % self.heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.heads={self.heads}")
        if self.image_stem not in IMAGE_STEMS:
            raise ConfigError(f"model.image_stem={self.image_stem!r} must be one of {', '.join(IMAGE_STEMS)}")
        if self.resnet not in RESNET_BLOCKS:
            raise ConfigError(f"model.resnet={self.resnet!r} must be one of {', '.join(RESNET_BLOCKS)}")
        if self.attention_impl not in ("math", "sdpa"):
            raise ConfigError(f"model.attention_impl={self.attention_impl!r} must be 'math' or 'sdpa'")
        if self.code_image_size % 8 or self.code_grid_size > self.image_bucket_size:
            raise ConfigError(
                f"model.code_image_size={self.code_image_size} must be a multiple of 8 and at most "
                f"8*image_bucket_size={8 * self.image_bucket_size}"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_drop_path_rate",
                     "decoder_drop_path_rate", "resnet_drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(f"model.prompt_dropout={self.prompt_dropout} must be in [0, 1)")
        for name in ("encoder_prompt_length", "decoder_prompt_length", "adapter_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0 (0 = off)")
        for name in ("encoder_layers", "decoder_layers", "heads", "d_model", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be a positive integer")

    def replace(self, **changes) -> "OFAConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    @classmethod
    def preset(cls, name: str, **overrides) -> "OFAConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown OFA preset {name!r}; choose one of {', '.join(PRESETS)}")
        cfg = cls(arch=name, **{**PRESETS[name], **overrides})
        cfg.validate()
        return cfg


# spec §4.1 (all presets derive from ofa_large_architecture; only these fields differ)
PRESETS: dict[str, dict] = {
    "ofa_tiny": dict(d_model=256, ffn_dim=1024, heads=4, encoder_layers=4, decoder_layers=4, resnet="resnet50"),
    "ofa_medium": dict(d_model=512, ffn_dim=2048, heads=8, encoder_layers=4, decoder_layers=4, resnet="resnet101"),
    "ofa_base": dict(d_model=768, ffn_dim=3072, heads=12, encoder_layers=6, decoder_layers=6, resnet="resnet101"),
    "ofa_large": dict(d_model=1024, ffn_dim=4096, heads=16, encoder_layers=12, decoder_layers=12,
                      resnet="resnet152"),
    "ofa_huge": dict(d_model=1280, ffn_dim=5120, heads=16, encoder_layers=24, decoder_layers=12,
                     resnet="resnet152"),
}

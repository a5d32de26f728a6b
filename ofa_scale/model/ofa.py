"""OFAModel: encoder + decoder sharing one token embedding that is also the output projection (spec §4)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ofa_scale.model import kernels
from ofa_scale.model.attention import MultiheadAttention
from ofa_scale.model.config import OFAConfig
from ofa_scale.model.decoder import OFADecoder
from ofa_scale.model.encoder import EncoderOut, OFAEncoder
from ofa_scale.model.layers import LayerFactory


class OFAModel(nn.Module):
    """`model(src_tokens=, patch_images=, patch_masks=, prev_output_tokens=, code_masks=None,
    sample_patch_num=None, patch_generator=None) -> logits (B, T, V)`.

    `all_layers=True` returns a tuple with one logits tensor per decoder layer (MuE training).
    `patch_images` are normalised float images (B, 3, H, W); `patch_masks` (B,) bool marks samples that have an
    image (False: every image position is padding). `sample_patch_num` (0/None = all) keeps that many random
    patches per image, drawn from `patch_generator` (a torch.Generator) so the choice is reproducible.
    """

    def __init__(self, config: OFAConfig, layers: LayerFactory | None = None):
        super().__init__()
        config.validate()
        self.config = config = dataclasses.replace(config)  # own copy: set_attention_impl edits it
        factory = layers if layers is not None else LayerFactory()
        if config.heads % factory.tp_size:
            from ofa_scale.errors import ConfigError

            raise ConfigError(f"model.heads={config.heads} is not divisible by tensor-parallel size "
                              f"{factory.tp_size}; pick a TP size that divides the head count")
        self.factory = factory
        embed_tokens = factory.vocab_embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.encoder = OFAEncoder(config, factory, embed_tokens)
        self.decoder = OFADecoder(config, factory, embed_tokens)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fairseq init_bert_params (spec §4.8): every Linear/Embedding ~ N(0, 0.02), biases and padding row 0.

        It overrides the zero init OFA gives the relative-position tables; convs (kaiming), BN/LN (1/0) and
        c_attn (1) keep their own init. Layers a TP factory builds (not nn.Linear) keep the factory's init.
        """
        std = self.config.init_std
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, std)
                    if module.padding_idx is not None and module.weight.numel():  # empty: partitioned by ZeRO-3
                        module.weight[module.padding_idx].zero_()

    def set_attention_impl(self, impl: str) -> None:
        """Switch every attention module between the "math" and "sdpa" kernels (weights unchanged)."""
        if impl not in ("math", "sdpa"):
            from ofa_scale.errors import ConfigError

            raise ConfigError(f"attention_impl={impl!r} must be 'math' or 'sdpa'")
        self.config.attention_impl = impl
        for module in self.modules():
            if isinstance(module, MultiheadAttention):
                module.impl = impl

    def describe_kernels(self, verbose: bool = False) -> dict[str, str]:
        """Which attention / LayerNorm kernels this model runs (see ofa_scale.model.kernels.describe)."""
        return kernels.describe(self.config.attention_impl, verbose=verbose)

    def reset_index_buffers(self) -> None:
        self.encoder.reset_index_buffers()
        self.decoder.reset_index_buffers()

    def tie_embeddings(self) -> None:
        """Re-point the decoder input/output embeddings at the encoder's (after replacing its weight)."""
        self.decoder.embed_tokens = self.encoder.embed_tokens
        self.decoder.output_projection.weight = self.encoder.embed_tokens.weight

    def forward(
        self,
        src_tokens: torch.Tensor,
        patch_images: torch.Tensor | None,
        patch_masks: torch.Tensor | None,
        prev_output_tokens: torch.Tensor,
        code_masks: torch.Tensor | None = None,
        sample_patch_num: int | None = None,
        patch_generator: torch.Generator | None = None,
        all_layers: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        encoder_out = self.encoder(src_tokens=src_tokens, patch_images=patch_images, patch_masks=patch_masks,
                                   sample_patch_num=sample_patch_num, generator=patch_generator)
        # all_layers: one logits tensor per decoder layer (MuE training, objectives/mue_loss.py)
        return self.decoder(prev_output_tokens, encoder_out, code_masks=code_masks, all_layers=all_layers)

    # beam-search helpers (the generator calls these on the model)
    @staticmethod
    def reorder_encoder_out(encoder_out: EncoderOut, new_order: torch.Tensor) -> EncoderOut:
        return encoder_out.index_select(new_order)

    @staticmethod
    def reorder_incremental_state(incremental_state: dict, new_order: torch.Tensor) -> dict:
        return OFADecoder.reorder_incremental_state(incremental_state, new_order)

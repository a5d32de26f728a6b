"""`model.prompt_tuning`: parameter-efficient finetuning (spec-ext §10.3), with OFA's defaults.

    model:
      pretrained: ofa_large.pt            # the frozen base model (required)
      prompt_tuning: {kind: prefix, length: 100}

kind: none (ordinary finetuning) | prefix (encoder and decoder prefix key/values) | adapter (bottleneck adapters,
`adapter_dim`) | bitfit (LayerNorm and fc biases). Only those parameters train (finetune/freeze.py), and each
checkpoint holds them alone (with their optimizer state and, with train.ema_decay, their EMA) plus a reference to
the base model (finetune/prompt_checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ofa_scale.errors import ConfigError

PromptKind = Literal["none", "prefix", "adapter", "bitfit"]


@dataclass
class PromptTuningSection:
    kind: PromptKind = "none"
    encoder: bool = True  # prefix: in the encoder's self-attention (OFA --encoder-prompt)
    decoder: bool = True  # prefix: in the decoder's self-attention (OFA --decoder-prompt)
    length: int = 100  # prefix length L_p (OFA --encoder/decoder-prompt-length, default and scripts 100)
    dropout: float = 0.2  # on the prefix key/values (hard-coded in OFA)
    projection: bool = False  # OFA's reparameterisation MLP (--*-prompt-projection; no OFA script uses it)
    adapter_dim: int = 200  # adapter bottleneck width (OFA --adapter-dim default; the RefCOCO script runs 100)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def validate(self, cfg) -> None:
        """Checks against the whole training config `cfg`."""
        if not self.enabled:
            return
        where = f"model.prompt_tuning.kind={self.kind}"
        if not cfg.task.name:
            raise ConfigError(f"{where} is a finetuning method; set task.name (and data.train/valid) or remove it")
        if not cfg.model.pretrained:
            raise ConfigError(f"{where} trains a few parameters on top of a frozen base model; set model.pretrained "
                              f"to that model (an OFA .pt, an ofa-convert model dir or an ofa-train run)")
        if self.projection:
            raise ConfigError("model.prompt_tuning.projection (OFA's reparameterisation MLP) is not supported; "
                              "set it to false (no OFA script turns it on)")
        if self.kind == "prefix":
            if self.length < 1 or not (self.encoder or self.decoder):
                raise ConfigError("model.prompt_tuning with kind=prefix needs length >= 1 and encoder and/or "
                                  "decoder true")
            if not 0.0 <= self.dropout < 1.0:
                raise ConfigError(f"model.prompt_tuning.dropout={self.dropout} must be in [0, 1)")
        if self.kind == "adapter" and self.adapter_dim < 1:
            raise ConfigError("model.prompt_tuning.adapter_dim must be >= 1 with kind=adapter")
        if cfg.train.freeze_encoder_embedding or cfg.train.freeze_decoder_embedding or cfg.train.freeze_resnet:
            raise ConfigError(f"train.freeze_* with {where} is redundant (everything but the tuned parameters is "
                              f"frozen); remove them")

    def model_overrides(self) -> dict:
        """The OFAConfig fields this section sets (architecture additions; BitFit adds none)."""
        prefix = self.kind == "prefix"
        return {"encoder_prompt_length": self.length if prefix and self.encoder else 0,
                "decoder_prompt_length": self.length if prefix and self.decoder else 0,
                "prompt_dropout": self.dropout,
                "adapter_dim": self.adapter_dim if self.kind == "adapter" else 0}

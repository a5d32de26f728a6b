"""Freezing parts of the model for finetuning (OFA's --freeze-encoder-embedding, --freeze-decoder-embedding,
--freeze-resnet; spec §7.1).

    apply_freezing(model, encoder_embedding=True, decoder_embedding=True, resnet=False)

* **Token embedding.** OFA shares one table between the encoder input, the decoder input and the output projection
  (--share-all-embeddings), so freezing either embedding freezes that one table — the output projection too, as in
  OFA, whose projection is the same Parameter.
* **ResNet.** Every parameter of the stem is frozen and its BatchNorm layers stay in eval mode for good: their
  running statistics are used, never updated, and `module.train()` (which the trainer and DeepSpeed call) cannot
  switch them back. OFA's own flag builds the stem with FrozenBatchNorm2d (affine and statistics fixed) and keeps
  training the convolutions; the issue asks for the whole ResNet fixed, which is what this does.

Why here, before `deepspeed.initialize`: `requires_grad` is a property of each Parameter object, which ZeRO-3
partitioning and tensor-parallel sharding keep, so setting it on this rank's module works under every layout; the
trainer then hands DeepSpeed only parameters that require gradients, and frozen ones get neither gradients nor
optimizer state.
"""

from __future__ import annotations

import types
from typing import Iterator

import torch
from torch import nn

from ofa_scale.errors import ConfigError

FROZEN_BN = "_ofa_frozen_batchnorm"


def token_embedding_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The shared token embedding's parameters (each once), for an OFA model or a pipeline stage."""
    from ofa_scale.parallel.pipeline_layers import SharedEmbedding

    seen: set[int] = set()
    for module in model.modules():
        tables = [getattr(module, "embed_tokens", None)]
        if isinstance(module, SharedEmbedding):
            tables.append(module.embedding)
        for table in tables:
            if isinstance(table, nn.Module):
                for p in table.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield p


def resnet_stems(model: nn.Module) -> list[nn.Module]:
    """The image stems (the ResNet, or OFA-OCR's ViT stem under model.image_stem: vit_b16, which
    train.freeze_resnet freezes in its place)."""
    from ofa_scale.model.resnet import ResNetStem
    from ofa_scale.model.vit_stem import ViTStem

    return [m for m in model.modules() if isinstance(m, (ResNetStem, ViTStem))]


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_batchnorm(module: nn.Module) -> int:
    """Put every BatchNorm under `module` in eval mode permanently (its `train` is replaced on the instance, so
    a later `model.train()` leaves it in eval); returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = types.MethodType(_stay_in_eval, m)
            m.eval()
            setattr(m, FROZEN_BN, True)
            count += 1
    return count


def _is_pipeline(model: nn.Module) -> bool:
    return hasattr(model, "tied_modules")


def apply_freezing(model: nn.Module, *, encoder_embedding: bool = False, decoder_embedding: bool = False,
                   resnet: bool = False) -> dict[str, int]:
    """Freeze what the flags name on this rank's module (call before deepspeed.initialize). Returns the number of
    parameter elements frozen per part (this rank's view: under ZeRO-3 the full shapes, under TP its shard), for
    logging."""
    frozen = {"embedding": 0, "resnet": 0}
    if encoder_embedding or decoder_embedding:
        if _is_pipeline(model):
            # DeepSpeed's pipeline all-reduces the tied embedding's .grad between the first and last stage, which
            # a frozen table does not have
            raise ConfigError("train.freeze_encoder_embedding / train.freeze_decoder_embedding are not supported "
                              "with parallel.pp > 1 (the pipeline all-reduces the tied embedding's gradient); use "
                              "pp=1 (tp and ZeRO-3 scale the model instead)")
        params = list(token_embedding_parameters(model))
        if not params:
            raise ConfigError("train.freeze_*_embedding found no token embedding in this model")
        for p in params:
            p.requires_grad_(False)
            frozen["embedding"] += _numel(p)
    if resnet:
        stems = resnet_stems(model)
        if not stems and not _is_pipeline(model):
            raise ConfigError("train.freeze_resnet found no ResNet in this model")
        for stem in stems:  # a pipeline stage other than the first holds none
            for p in stem.parameters():
                p.requires_grad_(False)
                frozen["resnet"] += _numel(p)
            freeze_batchnorm(stem)
    return frozen


def _numel(p: torch.Tensor) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3: p.data is an empty placeholder


def apply_prompt_freezing(model: nn.Module, kind: str) -> dict[str, int]:
    """Prompt tuning (model.prompt_tuning, spec-ext §10.3.4): only the prefix tables, the adapters or the BitFit
    biases train; everything else, the shared token embedding included, is frozen, and the ResNet's BatchNorm
    statistics too, so the base model stays bit-identical and a prompt checkpoint plus its base reproduces the
    trained model exactly. Two conscious departures from OFA: its BN statistics keep updating, and its
    adapter-only run (--adapter without a prompt) freezes only the embedding, which trains the whole backbone.

    Returns {"trainable": elements, "frozen": elements} (this rank's view, as apply_freezing)."""
    from ofa_scale.model.prompt_tuning import trainable

    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        keep = trainable(name, kind)
        p.requires_grad_(keep)
        counts["trainable" if keep else "frozen"] += _numel(p)
    if not counts["trainable"]:
        raise ConfigError(f"model.prompt_tuning.kind={kind} found no parameter to train in this model")
    for stem in resnet_stems(model):
        freeze_batchnorm(stem)
    return counts

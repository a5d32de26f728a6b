"""MuE's modality-decomposed encoder (spec ext §10.7.1; MuE `feature/MuE`: TransformerEncoder_MuE).

With `model.mue` (OFAConfig.mue, set through the training config's `model.overrides.mue: true`) the image tokens and
the text tokens run through the *same* encoder layers as two separate streams, so no image token attends to a
text token or back, in training and in inference alike. No parameter is added: the state dict is OFA's.

* text stream: the text tokens with the text-only absolute position bias plus each layer's token relative table,
  the text padding mask;
* image stream: the patch tokens with the image-only absolute bias plus each layer's image relative table, the
  image padding mask;
* output [image ; text] -> the final LayerNorm (encoder.finalize); the padding mask and the position embeddings
  the decoder reads are OFA's [image ; text] concatenations (encoder.embed builds them unchanged).

Each block bias is the matching diagonal block of the joint bias `encoder.embed` builds: the absolute bias of a
query/key pair depends on their two position embeddings only, so the image-only / text-only bias MuE computes from
the image / text positions alone is exactly that block.

Deviation (on purpose): MuE's code computes the image stream's relative bias and then overwrites it with the
absolute bias, so its image stream runs without image relative bias — a bug by every sign (the computed value is
dead). Here the image stream keeps its relative bias. MuE finetunes from ofa_base.pt, whose image tables were
trained in OFA's joint encoder, and under MuE's code those tables get no gradient, so they hold exactly the values
the pretrained encoder used on image×image attention; keeping them is what OFA's released weights expect (and
the SNLI-VE evaluation of §10.7.4 runs the ordinary `snli_ve_base_best.pt`, trained with them). A checkpoint trained
on MuE's branch never saw the bias, so its image stream would differ here.

Samples without an image (patch_masks False) have an all-padding image stream; attention masks with a finite
value, so those rows stay finite, and the decoder never attends to them. Early exit (model/early_exit.py) applies
per stream: `image` and `text` thresholds, each sample deciding on its own stream's tokens (MuE: img_thres,
txt_thres).
"""

from __future__ import annotations

import torch

from ofa_scale.model import early_exit


def run_decomposed_layers(encoder, x: torch.Tensor, padding_mask: torch.Tensor, pos,
                          exits: "early_exit.EarlyExitConfig | None") -> torch.Tensor:
    """The encoder layers over the image stream and the text stream apart -> [image ; text] (B, L, D), before
    the final LayerNorm. `exits`: per-stream early exit, None = every layer."""
    from ofa_scale.model.encoder import relative_layer_bias  # encoder.py imports this module

    n = pos.num_image_tokens
    stats = None if exits is None else exits.stats
    no_text = pos.text_buckets[:0, :0]  # the image stream has no text block
    streams = []
    if n:
        image_abs = pos.abs_bias[:, :, :n, :n]
        streams.append(("image", slice(0, n), 1.0 if exits is None else exits.image,
                        lambda i: relative_layer_bias(image_abs, encoder.token_rel_pos_table_list[i],
                                                      encoder.image_rel_pos_table_list[i], no_text,
                                                      pos.image_buckets)))
    text_abs = pos.abs_bias[:, :, n:, n:]
    streams.append(("text", slice(n, None), 1.0 if exits is None else exits.text,
                    lambda i: relative_layer_bias(text_abs, encoder.token_rel_pos_table_list[i],
                                                  encoder.image_rel_pos_table_list[i], pos.text_buckets, None)))
    out = []
    for part, span, threshold, bias_of in streams:
        pad = padding_mask[:, span]
        # like OFA, no key mask when nothing in the stream is padded
        layer_mask = pad if bool(pad.any()) else None
        out.append(early_exit.run_stack(encoder.layers, x[:, span], ~pad, layer_mask, bias_of, threshold, stats,
                                        part))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)

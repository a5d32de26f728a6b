"""Shared by the VQA and SNLI-VE task tests: tiny real shards read back with the loader, the tiny model, and the
trie-constrained loss check."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from ofa_scale.data.convert import convert
from ofa_scale.data.loader import ShardLoader
from ofa_scale.data.loader_config import LoaderConfig
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.objectives.batching import Collator, Composition
from ofa_scale.objectives.config import ObjectivesConfig, VLShape
from ofa_scale.objectives.token_loss import make_token_loss

PAD = 1


def jpeg_b64(width: int, height: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return base64.urlsafe_b64encode(buf.getvalue()).decode()


def shard_records(tmp_path, fmt: str, rows: list[list[str]]) -> list[dict]:
    """Write `rows` as an OFA TSV of format `fmt`, convert it with the real converter and read every record back
    with the loader (one epoch, record order by uniq_id)."""
    tsv = tmp_path / f"{fmt}.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    convert(tmp_path / "shards", finetune={fmt: [str(tsv)]}, workers=1)
    cfg = LoaderConfig(root=str(tmp_path / "shards"), composition={fmt: 1}, mode="epochs", epochs=1,
                       shuffle_buffer=1, on_corrupt="fail")
    records = [r for batch in ShardLoader(cfg) for r in batch]
    return sorted(records, key=lambda r: r["meta"]["uniq_id"])


def tiny_model() -> OFAModel:
    torch.manual_seed(0)
    return OFAModel(OFAConfig.preset("ofa_tiny", attention_impl="math")).eval()


def collate(examples: list[dict], task_name: str, lengths: tuple[int, int], image_size: int, vocab_size: int
            ) -> dict:
    """The "vl" group of one fixed-shape finetuning batch, built as finetune/workload.py builds it."""
    ocfg = ObjectivesConfig(tasks=["caption"], mix={"vl": 1, "text": 0, "image": 0, "detection": 0},
                            vl=VLShape(image_size=image_size, source_length=lengths[0], target_length=lengths[1]),
                            sample_patch_num=0, random_augment=False)
    collator = Collator(ocfg, Composition.from_config(ocfg, len(examples)), vocab_size=vocab_size,
                        task_ids={task_name: 0})
    group = collator(examples)["vl"]
    if "constraint_masks" in group:  # the batch holds them compact; these tests index the (B, T, V) mask
        group["constraint_masks"] = group["constraint_masks"].dense()
    return group


def constrained_loss_gradient(constraint_masks: torch.Tensor, target: torch.Tensor, conf: torch.Tensor,
                              epsilon: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per position, d loss.sum() / d logits) of the project's token loss on random logits."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*constraint_masks.shape, generator=g)).requires_grad_(True)
    losses = make_token_loss(None, epsilon=epsilon, ignore_index=PAD)(logits, target, conf=conf,
                                                                       constraint_masks=constraint_masks)
    losses.loss.sum().backward()
    return losses.loss.detach(), logits.grad


def smoothed_loss(logits: torch.Tensor, allowed: torch.Tensor, target: int, epsilon: float) -> float:
    """Spec §6.1 by hand for one position: softmax and smoothing restricted to `allowed`."""
    lp = torch.log_softmax(logits[allowed], dim=-1)
    ids = allowed.nonzero().flatten().tolist()
    nll = -float(lp[ids.index(target)])
    eps_i = epsilon / (len(ids) - 1)
    return (1 - epsilon - eps_i) * nll + eps_i * -float(lp.sum())

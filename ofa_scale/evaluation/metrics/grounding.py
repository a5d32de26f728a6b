"""Visual grounding (spec §7.3): predicted `<bin>` tokens to boxes, and Acc@0.5 with OFA's IoU convention."""

from __future__ import annotations

from typing import Sequence

NUM_BINS = 1000
MAX_IMAGE_SIZE = 512  # boxes are normalised by this, whatever the input resolution (spec §2.2, §9.4)


def bins_to_box(bins: Sequence[int], width: float, height: float, num_bins: int = NUM_BINS,
                max_image_size: float = MAX_IMAGE_SIZE, input_size: float | None = None) -> list[float]:
    """Bin indices x0 y0 x1 y1 -> box in original pixels: bin/(num_bins-1)·max_image_size on the
    input_size×input_size network input (default input_size = max_image_size, OFA's 512 px RefCOCO), then undo
    the squash resize (divide x by input_size/W, y by input_size/H)."""
    if len(bins) != 4:
        raise ValueError(f"a box needs 4 bins, got {len(bins)}")
    input_size = max_image_size if input_size is None else input_size
    scaled = [b / (num_bins - 1) * max_image_size for b in bins]
    w_ratio, h_ratio = input_size / width, input_size / height
    return [scaled[0] / w_ratio, scaled[1] / h_ratio, scaled[2] / w_ratio, scaled[3] / h_ratio]


def tokens_to_box(tokens: Sequence[int], bin_offset: int, width: float, height: float,
                  num_bins: int = NUM_BINS) -> list[float]:
    """The first 4 generated tokens -> box (bin = token − bin_offset, as OFA does; no check that they are
    bins, so a non-bin token yields a box far outside the image that scores 0)."""
    return bins_to_box([int(t) - bin_offset for t in tokens[:4]], width, height, num_bins)


def box_iou(pred: Sequence[float], gt: Sequence[float]) -> tuple[float, float, float]:
    """(IoU, intersection width, intersection height) with OFA's convention: continuous coordinates (no +1),
    IoU = inter / (area_p + area_g − inter + 1e-6); widths may be negative when the boxes do not overlap."""
    ix0, iy0 = max(pred[0], gt[0]), max(pred[1], gt[1])
    ix1, iy1 = min(pred[2], gt[2]), min(pred[3], gt[3])
    inter_w, inter_h = ix1 - ix0, iy1 - iy0
    inter = inter_w * inter_h
    area_p = (pred[2] - pred[0]) * (pred[3] - pred[1])
    area_g = (gt[2] - gt[0]) * (gt[3] - gt[1])
    return inter / (area_p + area_g - inter + 1e-6), inter_w, inter_h


def grounding_hit(pred: Sequence[float], gt: Sequence[float], threshold: float = 0.5) -> float:
    """1.0 if IoU >= threshold and the intersection has positive width and height, else 0.0."""
    iou, inter_w, inter_h = box_iou(pred, gt)
    return float(iou >= threshold and inter_w > 0 and inter_h > 0)

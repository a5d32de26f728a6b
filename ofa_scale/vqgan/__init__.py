"""The VQGAN image tokenizer OFA uses (taming-transformers GumbelVQ, f = 8, 8192 codes; spec §10.5).

Public API:
    model = load_vqgan(DIR, device=None)         # DIR/model.yaml + DIR/last.ckpt, strict and safe
    codes = model.encode(images)                 # (N, H/8, W/8) int64; sample=True, seeds=… for OFA's Gumbel codes
    images = model.decode(codes)                 # uint8 (N, 8h, 8w, 3); codes (N, h, w) or (N, h*w)
"""

from ofa_scale.vqgan.checkpoint import load_vqgan, save_taming_checkpoint
from ofa_scale.vqgan.config import DDConfig, VQGANConfig
from ofa_scale.vqgan.images import psnr, square_image, to_pil
from ofa_scale.vqgan.model import VQGAN

__all__ = ["load_vqgan", "save_taming_checkpoint", "VQGAN", "VQGANConfig", "DDConfig", "square_image", "to_pil",
           "psnr"]

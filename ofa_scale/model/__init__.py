"""The OFA model in plain torch (no torch.distributed): config, layer factory, encoder/decoder, kernels.

`load_pretrained` (checkpoint import) lives in `ofa_scale.model.checkpoint` and is re-exported lazily.
"""

from ofa_scale.model.config import OFAConfig
from ofa_scale.model.decoder import DecoderPositions, OFADecoder
from ofa_scale.model.encoder import EncoderOut, EncoderPositions, OFAEncoder
from ofa_scale.model.layers import LayerFactory
from ofa_scale.model.ofa import OFAModel

__all__ = [
    "DecoderPositions",
    "EncoderOut",
    "EncoderPositions",
    "LayerFactory",
    "OFAConfig",
    "OFADecoder",
    "OFAEncoder",
    "OFAModel",
    "load_pretrained",
]


def __getattr__(name: str):
    # lazy so that importing the model never requires the checkpoint module (owned and built separately)
    if name == "load_pretrained":
        from ofa_scale.model.checkpoint import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'ofa_scale.model' has no attribute {name!r}")

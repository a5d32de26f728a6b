"""ofa-scale: pretrain and finetune OFA at cluster scale."""

__version__ = "0.1.0"

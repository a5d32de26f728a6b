"""Distribution of the model: layouts, megatron-core tensor parallel, DeepSpeed pipeline, the planner.

`validate_layout` is pure (runs before any process group); `setup_parallel` needs torch.distributed initialised.
"""

from ofa_scale.parallel.layout import Layout, ModelShape, ParallelConfig, model_shape, pad_vocab, validate_layout


def setup_parallel(layout, seed=None):
    from ofa_scale.parallel.context import setup_parallel as _setup

    return _setup(layout, seed=seed)


__all__ = ["Layout", "ModelShape", "ParallelConfig", "model_shape", "pad_vocab", "validate_layout", "setup_parallel"]

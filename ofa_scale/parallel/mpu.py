"""The `mpu` object DeepSpeed asks for, backed by megatron-core's parallel_state.

DeepSpeed calls names that megatron-core no longer has (`get_model_parallel_rank/_world_size/_group`, the
`get_slice_parallel_*` family) and decides from them which parameters to count once in the gradient norm and
over which group ZeRO partitions. Passing `parallel_state` itself would fail on the first missing name, so this
adapter maps every name DeepSpeed uses onto the megatron-core groups.

"Model parallel" here means tensor parallel: we hand this object to DeepSpeed only for pp == 1 (with pp > 1 the
PipelineModule's own grid is DeepSpeed's mpu). With TP alone the model-parallel group *is* the TP group, which is
what ZeRO's norm code assumes when it counts replicated parameters on model-parallel rank 0 only.
"""

from __future__ import annotations

import torch.distributed as dist


class MegatronMPU:
    """DeepSpeed's mpu interface over megatron-core parallel_state (which must already be initialised)."""

    def __init__(self):
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("MegatronMPU needs megatron-core parallel_state initialised (call setup_parallel)")
        self._ps = parallel_state

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    # "model parallel" as DeepSpeed means it (see module docstring): the TP group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

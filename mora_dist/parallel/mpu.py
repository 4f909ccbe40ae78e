"""DeepSpeed's ``mpu`` interface over megatron-core's ``parallel_state`` (the one adapter between the two).

Spec: §4, §5.
"""

from __future__ import annotations

from typing import Any

import torch


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over ``megatron.core.parallel_state``, which lacks DeepSpeed's
    ``get_model_parallel_world_size``/``_rank`` names. DeepSpeed's "model parallel" is megatron's tensor x pipeline
    group. Pass ``deepspeed.initialize(..., mpu=MegatronMPU())`` after ``initialize_model_parallel``. Spec: §4, §5.
    """

    def __init__(self, parallel_state: Any = None) -> None:
        if parallel_state is None:
            from megatron.core import parallel_state  # megatron-core is heavy: loaded only when an mpu is built
        self._ps = parallel_state

    def get_model_parallel_group(self) -> Any:
        return self._ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(self.get_model_parallel_group())

    def get_expert_tensor_model_pipeline_parallel_group(self) -> Any:
        """The group a MoE expert's weights are split over (expert TP x expert parallel x pipeline)."""
        return self._ps.get_expert_tensor_model_pipeline_parallel_group()

    def get_data_parallel_group(self) -> Any:
        return self._ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return torch.distributed.get_process_group_ranks(self.get_data_parallel_group())

    def get_tensor_model_parallel_group(self) -> Any:
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

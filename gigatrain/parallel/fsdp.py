"""Data parallelism with FSDP2 (`fully_shard`): parameters, gradients and optimizer state
sharded over dp_shard*cp, replicated over dp_replicate (HSDP when both are > 1; plain
replication, like DDP, when only dp_replicate is)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, fsdp_mesh: DeviceMesh, param_dtype: torch.dtype | None, reshard_after_forward: bool) -> None:
    """Shard each block, then the rest (embeddings, final norm, head) as the root.

    One unit per block lets FSDP gather block i+1's weights while block i computes. On
    GPU the gathered weights are cast to bf16 and gradients reduced in fp32, which halves
    the all-gather bytes without losing precision in the sum.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.layers.values():
        fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)

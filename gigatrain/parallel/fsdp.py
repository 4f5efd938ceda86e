"""Data parallelism with FSDP2 (`fully_shard`): parameters, gradients and optimizer state
sharded over dp_shard*cp, replicated over dp_replicate (HSDP when both are > 1; plain
replication, like DDP, when only dp_replicate is).

Under expert parallelism the routed experts are sharded on their own mesh first (they are
already split over ep): dp_replicate x efsdp, the data-parallel ranks that hold the same
experts (docs/moe.md)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from gigatrain.parallel.expert import moe_layers


def apply_fsdp(model: nn.Module, fsdp_mesh: DeviceMesh, param_dtype: torch.dtype | None, reshard_after_forward: bool,
               efsdp_mesh: DeviceMesh | None = None) -> None:
    """Shard each block, then the rest (embeddings, final norm, head) as the root.

    One unit per block lets FSDP gather block i+1's weights while block i computes. On
    GPU the gathered weights are cast to bf16 and gradients reduced in fp32, which halves
    the all-gather bytes without losing precision in the sum.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    if efsdp_mesh is not None:
        shard_experts(model, efsdp_mesh, policy, reshard_after_forward)
    for block in model.layers.values():
        fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def shard_experts(model: nn.Module, efsdp_mesh: DeviceMesh, policy: MixedPrecisionPolicy,
                  reshard_after_forward: bool) -> None:
    """FSDP of each expert-parallel experts module over the ranks holding the same experts (the
    enclosing block's unit then leaves its parameters alone); its gradient mean over them is
    the mean over all data-parallel ranks (parallel/expert.py says why).

    Experts are split along dim 0 while each rank still gets whole ones, else along the hidden
    dimension (dim 1, as torchtitan does), so no rank gets padding only."""
    for _, moe in moe_layers(model):
        local_experts = moe.experts.w1.to_local().shape[0]
        placement = Shard(0) if local_experts % efsdp_mesh.size() == 0 else Shard(1)
        fully_shard(moe.experts, mesh=efsdp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=lambda param, placement=placement: placement)

"""Expert parallelism: each MoE layer's routed experts split over the ranks of the ep mesh.

Rank r of an EP group of size ep holds experts [r*E/ep, (r+1)*E/ep) whole: the stacked weights
w1, w2, w3 become DTensors Shard(0) over the ep mesh (the checkpoint keeps the whole [E, ...]
tensors' names and shapes, so DCP reshards them to any other ep). The MoE layer itself is
unchanged: it routes its own tokens, sorts them by expert and calls `experts(x, counts)`; the
experts module, made expert-parallel here, then

  1. exchanges the token counts (all-to-all of [E] counts: rank r learns how many tokens each
     peer sends to each of its local experts),
  2. sends every token to the rank of its expert (all-to-all, uneven splits, with autograd: the
     backward is the reverse all-to-all),
  3. regroups what it received, which arrives peer by peer, so that each local expert's tokens
     are contiguous (peer order inside an expert: the same sum order on every layout),
  4. runs the model's own expert computation on its local weights,
  5. undoes 3 and 2: every token's output comes back to the rank and position it left from.

The gradient of a local expert's weights sums the contributions of the whole EP group's tokens,
where every other weight's holds one rank's: it is divided by ep, so that FSDP's mean over the
ranks that hold the same experts (dp_replicate x efsdp, dp/ep of them) is the mean over all dp
ranks, as for every other weight. (FSDP's own set_gradient_divide_factor would do it too, but
with a PREMUL_SUM reduction that gloo lacks.) For ep a power of two the division is exact.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.utils.stateless import _reparametrize_module

from gigatrain.models.moe import MoE


def regroup_index(counts: torch.Tensor) -> torch.Tensor:
    """counts [peers, local_experts]: tokens received from each peer for each local expert, in
    the order they arrive (peer-major). Returns the index that reorders the received rows
    expert-major (expert 0's tokens from peer 0, 1, ..., then expert 1's, ...)."""
    flat = counts.flatten()
    arrival_start = flat.cumsum(0) - flat  # where each (peer, expert) run begins on arrival
    by_expert = counts.T.flatten()
    grouped_start = by_expert.cumsum(0) - by_expert  # where it begins once grouped by expert
    shift = arrival_start.view(counts.shape).T.flatten() - grouped_start
    return torch.arange(int(flat.sum()), device=counts.device) + torch.repeat_interleave(shift, by_expert)


def dispatch(x: torch.Tensor, tokens_per_expert: torch.Tensor, group: DeviceMesh):
    """Send x (sorted by global expert, tokens_per_expert [E] rows each) to the ranks of its
    experts. Returns (this rank's tokens grouped by local expert, their counts [E/ep], and the
    state `combine` needs)."""
    ep = group.size()
    sent_counts = tokens_per_expert.to(torch.int64)
    received_counts = all_to_all_single(sent_counts, None, None, group=group)
    # One host sync per layer: uneven splits must be known to size the exchange.
    received_counts = received_counts.view(ep, -1)
    input_splits = sent_counts.view(ep, -1).sum(dim=1).tolist()
    output_splits = received_counts.sum(dim=1).tolist()
    received = wait_tensor(all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group=group))
    index = regroup_index(received_counts)
    return received[index], received_counts.sum(dim=0), (index, input_splits, output_splits)


def combine(out: torch.Tensor, state, group: DeviceMesh) -> torch.Tensor:
    """Each output of `dispatch`'s tokens back to where its token came from."""
    index, input_splits, output_splits = state
    arrival_order = out[index.argsort()]
    return wait_tensor(all_to_all_single_autograd(arrival_order, input_splits, output_splits, group=group))


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _ExpertParallel:
    """Mixed into the model's experts class (see `apply_ep`): the same module, names and
    parameters, with a forward that runs the experts where they live."""

    ep_mesh: DeviceMesh

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        local_x, local_counts, state = dispatch(x, tokens_per_expert, self.ep_mesh)
        # The model's own computation, on this rank's experts: the DTensor weights' local
        # shards (to_local is differentiable: the gradient comes back as a Shard(0) DTensor).
        scale = 1.0 / self.ep_mesh.size()
        local = {name: _ScaleGradient.apply(p.to_local(), scale)
                 for name, p in self.named_parameters(recurse=False) if isinstance(p, DTensor)}
        with _reparametrize_module(self, local):
            out = super().forward(local_x, local_counts)
        return combine(out, state, self.ep_mesh)


@functools.cache
def _expert_parallel_class(base: type) -> type:
    return type(f"ExpertParallel{base.__name__}", (_ExpertParallel, base), {})


def moe_layers(*parts: nn.Module) -> list[tuple[int, MoE]]:
    """(layer index in the whole model, its MoE) for each MoE layer these parts hold (a whole
    model or this rank's pipeline stages), in layer order. The blocks keep their whole-model
    keys in every stage, whatever wraps them (activation checkpointing, compile)."""
    found = [(int(key), module) for part in parts for key, block in part.layers.items()
             for module in block.modules() if isinstance(module, MoE)]
    return sorted(found, key=lambda pair: pair[0])


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Make every MoE layer of `model` (a whole model or a pipeline stage) expert-parallel
    over `ep_mesh`, in place; works on a meta-device model (no data moves)."""
    for _, moe in moe_layers(model):
        make_expert_parallel(moe.experts, ep_mesh)


def make_expert_parallel(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Split `experts`' stacked weights over `ep_mesh` (Shard(0): whole experts per rank) and
    give it the forward that exchanges tokens; names and global shapes are unchanged."""
    for name, param in list(experts.named_parameters(recurse=False)):
        # src_data_rank=None: each rank keeps its own slice, no broadcast (a meta model's
        # weights are drawn later, per shard, by `materialize`).
        sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    experts.__class__ = _expert_parallel_class(type(experts))
    experts.ep_mesh = ep_mesh

"""Context parallelism: each rank of the cp group holds a share of every sequence.

PyTorch's ring-attention `context_parallel` dispatches only CUDA's SDPA kernels, so this
is the all-gather form Llama 3 trained with, which runs on any backend: a rank keeps
its queries and all-gathers keys and values over the cp group with an autograd-aware
functional collective (the backward is a reduce-scatter), then attends with a causal
mask written in true positions. With grouped-query attention K and V are a fraction of
the activations, so gathering them costs little next to the attention itself.

Load balance: the sequence is cut into 2*cp chunks and rank i holds chunks i and
2*cp-1-i, so under the causal mask every rank does the same work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # torch >= 2.12, where all_gather_tensor_autograd, its older name, warns on every call
    from torch.distributed._functional_collectives import all_gather_single_autograd
except ImportError:  # torch 2.11
    from torch.distributed._functional_collectives import all_gather_tensor_autograd as all_gather_single_autograd
from torch.distributed.device_mesh import DeviceMesh


def rank_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The token positions rank `cp_rank` holds, in the order it holds them."""
    chunk = seq_len // (2 * cp)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    tail = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([head, tail])


class ContextParallelAttention(nn.Module):
    """CoreAttention for local queries against the whole sequence's keys and values."""

    def __init__(self, cp_mesh: DeviceMesh, seq_len: int, device: torch.device):
        super().__init__()
        self.cp_mesh = cp_mesh
        cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
        query_positions = rank_positions(seq_len, cp, rank)
        # Gathered keys arrive rank by rank, each rank's in its own order.
        key_positions = torch.cat([rank_positions(seq_len, cp, r) for r in range(cp)])
        # A plain attribute, not a buffer: materialising a meta model (to_empty) would wipe it.
        self.mask = (query_positions[:, None] >= key_positions[None, :]).to(device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = all_gather_single_autograd(k.contiguous(), gather_dim=2, group=self.cp_mesh)
        v = all_gather_single_autograd(v.contiguous(), gather_dim=2, group=self.cp_mesh)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=k.shape[1] != q.shape[1])


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int, device: torch.device) -> None:
    """Swap every block's core attention for one that attends over the whole sequence."""
    for block in model.layers.values():
        block.attention.core = ContextParallelAttention(cp_mesh, seq_len, device)


def shard_rope(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int) -> None:
    """Keep only this rank's rows of the (initialised) rotary tables, so position p is
    rotated by p's angle wherever it lives."""
    positions = rank_positions(seq_len, cp_mesh.size(), cp_mesh.get_local_rank()).to(model.rope_cos.device)
    model.register_buffer("rope_cos", model.rope_cos[positions].clone(), persistent=False)
    model.register_buffer("rope_sin", model.rope_sin[positions].clone(), persistent=False)


def shard_sequence(tokens: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
    """This rank's columns of a [batch, seq] tensor (inputs or targets)."""
    positions = rank_positions(tokens.shape[1], cp_mesh.size(), cp_mesh.get_local_rank())
    return tokens[:, positions.to(tokens.device)]

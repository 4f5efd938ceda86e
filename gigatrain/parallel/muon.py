"""Muon for the hidden matrices and AdamW for everything else, in one optimizer, on whole
or sharded (DTensor) parameters.

Muon (Keller Jordan, 2024) replaces a matrix's momentum-averaged gradient by its nearest
semi-orthogonal matrix (all singular values ~1), computed by a quintic Newton–Schulz
iteration. The iteration needs the whole matrix: under FSDP2, HSDP and TP a rank holds a
shard, and orthogonalising a shard is a different update (never what one process computes).
So each sharded matrix is made whole on one owner rank, orthogonalised there and sent back
in shards (`orthogonalized_shards`): matrices of one layout are dealt out round-robin, one per
rank of the dimension that splits them, through an all-to-all, so the Newton–Schulz work is
divided among the ranks. Layouts split along two mesh dimensions (FSDP x TP) take the simple
exact path instead: every rank gathers the whole matrix (`full_tensor`) and keeps its shard
of the result. A shard that already holds whole matrices (a stack of experts split only
along its expert dimension, as FSDP and expert parallelism split it) is orthogonalised where
it lies, with no communication. Momentum buffers are DTensors sharded like their
parameters, so the optimizer state reshards through DCP like AdamW's.

The math is torch.optim.Muon's (its constants, its learning-rate adjustment, and the same
operations in the same order, which tests/parallel/test_muon.py checks bit for bit); it is
not used directly because it takes only whole 2-D matrices, always iterates in bfloat16, and
is a second optimizer beside AdamW where the checkpoint expects one per model part.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr

NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)


def orthogonalize(update: torch.Tensor, dtype: torch.dtype, steps: int = DEFAULT_NS_STEPS) -> torch.Tensor:
    """The quintic Newton–Schulz iteration of torch.optim.Muon, in `dtype`, batched over any
    leading dimensions (each [..., m, n] slice is one matrix). On a 2-D matrix in bfloat16 it
    is torch's operation for operation."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = update.size(-2) > update.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    if x.dim() == 2:
        x = x / x.norm().clamp(min=EPS)  # Frobenius norm >= spectral norm: singular values <= 1
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        shape = x.shape
        x = x.reshape(-1, *shape[-2:])
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=EPS)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.reshape(shape)
    return x.mT if tall else x


def _holds_whole_matrices(tensor: DTensor) -> bool:
    """Whether every shard is made of whole [m, n] matrices: sharded only along leading dims
    (or over mesh dimensions of one rank, which split nothing)."""
    mesh = tensor.device_mesh
    return all(not p.is_shard() or p.dim < tensor.dim() - 2 or mesh.size(i) == 1
               for i, p in enumerate(tensor.placements))


def orthogonalized_shard(update: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """This rank's part of the orthogonalised whole matrix (or matrices) whose local part is
    `update`, sharded as `like` (a DTensor gradient, or a plain tensor: then `update` is whole)."""
    if not isinstance(like, DTensor) or _holds_whole_matrices(like):
        return orthogonalize(update, dtype)
    sharded = DTensor.from_local(update, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    whole = orthogonalize(sharded.full_tensor(), dtype)
    # Every rank holds the same whole result; src_data_rank=None slices it locally, no scatter.
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _owner_axis(like: DTensor) -> int | None:
    """The mesh dimension that splits a 2-D matrix, when every other one replicates it (FSDP,
    TP, HSDP's shard dimension): matrices of that layout can be dealt out one per rank along it.
    (FSDP x TP's strided shards take the gather instead.)"""
    if like.dim() != 2:
        return None
    placements = like.placements
    sharded = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if len(sharded) != 1 or type(placements[sharded[0]]) is not Shard or like.device_mesh.size(sharded[0]) == 1:
        return None
    return sharded[0]


def orthogonalized_shards(updates: list[torch.Tensor], likes: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """`orthogonalized_shard` of each (update, like), with the work of sharded matrices divided:
    matrices of one layout (mesh, placements, shape) split along one mesh dimension of W ranks
    go W at a time, stacked, through one all-to-all that leaves each rank one whole matrix (its
    owner: round-robin), which it orthogonalises; a second all-to-all returns every rank its
    shards. The same bytes as one matrix's all-gather per W matrices, and 1/W of the
    Newton–Schulz work, against W times both for gathering every matrix everywhere. A short
    last batch is padded with zero matrices (orthogonalised to zero). Any other layout takes
    `orthogonalized_shard`."""
    results: list[torch.Tensor | None] = [None] * len(updates)
    batches: dict[tuple, list[int]] = {}
    for i, (update, like) in enumerate(zip(updates, likes)):
        axis = _owner_axis(like) if isinstance(like, DTensor) else None
        if axis is None or _holds_whole_matrices(like):
            results[i] = orthogonalized_shard(update, like, dtype)
        else:
            batches.setdefault((like.device_mesh, tuple(like.placements), tuple(like.shape), axis), []).append(i)
    for (mesh, placements, shape, axis), indices in batches.items():
        ranks = mesh.size(axis)
        stacked_placements = [Shard(p.dim + 1) if p.is_shard() else p for p in placements]
        owned_placements = list(stacked_placements)
        owned_placements[axis] = Shard(0)
        for start in range(0, len(indices), ranks):
            chunk = indices[start:start + ranks]
            locals_ = [updates[i] for i in chunk]
            locals_ += [torch.zeros_like(locals_[0])] * (ranks - len(chunk))
            stacked = DTensor.from_local(torch.stack(locals_), mesh, stacked_placements, shape=(ranks, *shape),
                                         stride=torch.empty(ranks, *shape, device="meta").stride())
            owned = stacked.redistribute(mesh, owned_placements)  # all-to-all: this rank's matrix whole
            # [1, m, n]: one whole matrix, through the 2-D iteration one process runs on it (made
            # contiguous: a strided matrix takes other matmul kernels, other rounding).
            done = DTensor.from_local(orthogonalize(owned.to_local()[0].contiguous(), dtype).unsqueeze(0), mesh, owned_placements,
                                      shape=owned.shape, stride=owned.stride())
            back = done.redistribute(mesh, stacked_placements).to_local()  # all-to-all: the shards home
            for j, i in enumerate(chunk):
                results[i] = back[j]
    return results


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class MuonWithAdamW(torch.optim.AdamW):
    """Param groups marked `"muon": True` step with Muon (momentum, nesterov and the rate
    adjustment below); every other group is torch's AdamW (fused where it can be). Each group
    has its own `lr` and `weight_decay`. One optimizer, so DCP saves and reshards its state
    (Muon's `momentum_buffer`, AdamW's moments) keyed by parameter name like AdamW's alone.

    `adjust_lr_fn`: "original" (Keller Jordan: lr * sqrt(max(1, out/in))) or
    "match_rms_adamw" (Moonshot: lr * 0.2 * sqrt(max(out, in)), the RMS of an AdamW update).
    `ns_dtype`: the Newton–Schulz iteration's precision (bfloat16 on GPUs, as torch's).
    """

    def __init__(self, groups: list[dict], *, betas: tuple[float, float], eps: float, fused: bool,
                 momentum: float, nesterov: bool = True, adjust_lr_fn: str = "original",
                 ns_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__([{"muon": False, **group} for group in groups], betas=betas, eps=eps, fused=fused)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices (or stacks of them) only")
        self.momentum, self.nesterov = momentum, nesterov
        self.adjust_lr_fn, self.ns_dtype = adjust_lr_fn, ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        every = self.param_groups
        self.param_groups = [group for group in every if not group["muon"]]
        try:  # AdamW's step runs over the param groups it sees
            loss = super().step(closure)
        finally:
            self.param_groups = every
        for group in every:
            if group["muon"]:
                self._muon_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        updates = []
        for param in params:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param.grad)  # sharded like the gradient
                # A step count as AdamW keeps one: its state loader requires one in every state.
                state["step"] = torch.tensor(0.0)
            state["step"] += 1
            grad, buffer = _local(param.grad), _local(state["momentum_buffer"])
            # torch.optim.Muon's step, on this rank's elements (all element-wise but the NS).
            buffer.lerp_(grad, 1 - self.momentum)
            updates.append(grad.lerp(buffer, self.momentum) if self.nesterov else buffer)
        updates = orthogonalized_shards(updates, [p.grad for p in params], self.ns_dtype)
        for param, update in zip(params, updates):
            local = _local(param)
            local.mul_(1 - lr * weight_decay)
            local.add_(update, alpha=-_adjust_lr(lr, self.adjust_lr_fn, param.shape[-2:]))

"""Muon for the hidden matrices and AdamW for everything else, in one optimizer, on whole
or sharded (DTensor) parameters.

Muon (Keller Jordan, 2024) replaces a matrix's momentum-averaged gradient by its nearest
semi-orthogonal matrix (all singular values ~1), computed by a quintic Newton–Schulz
iteration. The iteration needs the whole matrix: under FSDP2, HSDP and TP a rank holds a
shard, and orthogonalising a shard is a different update (never what one process computes).
So the step gathers each sharded matrix's update (`full_tensor`), orthogonalises it, and each
rank keeps its own shard of the result: exact, at the price of every rank repeating the
Newton–Schulz work of every sharded matrix (docs/training.md says what an owner-per-matrix
version would save). A shard that already holds whole matrices (a stack of experts split
only along its expert dimension, as expert parallelism splits it) is orthogonalised where it
lies, with no communication. Momentum buffers are DTensors sharded like their parameters, so
the optimizer state reshards through DCP like AdamW's.

The math is torch.optim.Muon's (its constants, its learning-rate adjustment, and the same
operations in the same order, which tests/parallel/test_muon.py checks bit for bit); it is
not used directly because it takes only whole 2-D matrices, always iterates in bfloat16, and
is a second optimizer beside AdamW where the checkpoint expects one per model part.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
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
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param.grad)  # sharded like the gradient
                # A step count as AdamW keeps one: its state loader requires one in every state.
                state["step"] = torch.tensor(0.0)
            state["step"] += 1
            grad, buffer = _local(param.grad), _local(state["momentum_buffer"])
            # torch.optim.Muon's step, on this rank's elements (all element-wise but the NS).
            buffer.lerp_(grad, 1 - self.momentum)
            update = grad.lerp(buffer, self.momentum) if self.nesterov else buffer
            update = orthogonalized_shard(update, param.grad, self.ns_dtype)
            local = _local(param)
            local.mul_(1 - lr * weight_decay)
            local.add_(update, alpha=-_adjust_lr(lr, self.adjust_lr_fn, param.shape[-2:]))

"""AdamW with weight decay on matrices only, fused where the device supports it."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gigatrain.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    # Norm gains are vectors; decaying them towards zero only fights the normalisation.
    groups = []
    for weight_decay, members in ((cfg.weight_decay, [p for p in params if p.dim() >= 2]),
                                  (0.0, [p for p in params if p.dim() < 2])):
        # One group per mesh: a fused (or foreach) step runs on one group's tensors at once,
        # and DTensor refuses an op that mixes plain tensors and DTensors (an MoE layer's
        # weights are plain under tensor parallelism alone, the rest are DTensors). Optimizer
        # state is checkpointed by parameter name, so the grouping does not reach checkpoints.
        by_mesh: dict = {}
        for p in members:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        groups += [{"params": group, "weight_decay": weight_decay} for group in by_mesh.values() or [[]]]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)

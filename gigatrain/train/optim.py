"""The optimizer: AdamW (`train.optimizer=adamw`), or Muon for the blocks' matrices with
AdamW for the rest (`muon`, gigatrain/parallel/muon.py). Each param group carries `lr_scale`,
its learning rate over `train.lr`, so one schedule (train/schedule.py) drives every group."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gigatrain.config import TrainConfig
from gigatrain.models.transformer import parameter_groups
from gigatrain.parallel.muon import MuonWithAdamW


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type in ("cuda", "cpu")
    groups = param_groups(model, cfg)
    if cfg.optimizer == "muon":
        return MuonWithAdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused,
                             momentum=cfg.muon_momentum, adjust_lr_fn=cfg.muon_scale,
                             # bfloat16 is the tensor cores' precision; a CPU's bfloat16 matmuls are
                             # no faster than fp32 ones, so it keeps fp32's accuracy there.
                             ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The param groups of either optimizer, by `parameter_role` (models/transformer.py).

    - Rates: the blocks' matrices at train.lr (AdamW) or train.muon_lr (Muon), embeddings and
      head at train.embed_lr / train.head_lr (0: train.lr), the router and vectors at train.lr.
    - Muon steps the matrices (`"muon": True`); embeddings, head, router and vectors stay on
      AdamW under both. An embedding's gradient is a sparse sum of looked-up rows, not a linear
      map to orthogonalise; the head maps into the vocabulary's logits; the router gate
      ([experts, d_model]) under Muon would give every expert's row a unit-size push each step
      whatever its gradient, which churns routing, and it is small enough for AdamW to cost nothing.
    - Weight decay on matrices only: norm gains are vectors, and decaying them towards zero
      only fights the normalisation.
    - One group per role and mesh: a fused (or foreach) step runs on one group's tensors at
      once, and DTensor refuses an op that mixes plain tensors and DTensors (an MoE layer's
      weights are plain under tensor parallelism alone, the rest are DTensors). Optimizer state
      is checkpointed by parameter name, so the grouping does not reach checkpoints."""
    muon = cfg.optimizer == "muon"
    embed_lr = cfg.embed_lr or cfg.lr
    # A tied head is the embeddings' weight: under a pipeline the last stage's copy of it is
    # named as a head, and must step as the first stage's embeddings do.
    head_lr = embed_lr if model.args.tie_embeddings else cfg.head_lr or cfg.lr
    rates = {"matrix": cfg.muon_lr if muon else cfg.lr, "embed": embed_lr, "head": head_lr,
             "router": cfg.lr, "vector": cfg.lr}
    groups = []
    for role, members in parameter_groups(model).items():
        by_mesh: dict = {}
        for _, param in members:
            by_mesh.setdefault(param.device_mesh if isinstance(param, DTensor) else None, []).append(param)
        groups += [{"params": params, "role": role, "muon": muon and role == "matrix", "lr": rates[role],
                    "lr_scale": rates[role] / cfg.lr, "weight_decay": 0.0 if role == "vector" else cfg.weight_decay}
                   for params in by_mesh.values()]
    return groups


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's rate for a step whose train.lr-scheduled rate is `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]

"""The optimizer: AdamW (`train.optimizer=adamw`), or Muon for the blocks' matrices with
AdamW for the rest (`muon`, gigatrain/parallel/muon.py). Each param group carries `lr_scale`,
its learning rate over `train.lr`, so one schedule (train/schedule.py) drives every group."""

from __future__ import annotations

import torch
from torch import nn

from gigatrain.config import TrainConfig
from gigatrain.parallel.muon import MuonWithAdamW


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "muon":
        return MuonWithAdamW(muon_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused,
                             momentum=cfg.muon_momentum, adjust_lr_fn=cfg.muon_scale,
                             # bfloat16 is the tensor cores' precision; a CPU's bfloat16 matmuls are
                             # no faster than fp32 ones, so it keeps fp32's accuracy there.
                             ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    # Norm gains are vectors; decaying them towards zero only fights the normalisation.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def optimizer_role(name: str, param: torch.Tensor) -> str:
    """Which group a parameter belongs to under Muon, by its name in the model:
    "embed" (token embeddings, and the head when tied: one weight), "head" (an untied output
    head), "muon" (every other matrix in the blocks: attention, MLP, shared experts, and each
    routed expert's slice of a stacked [E, out, in] weight), "router" (an MoE router's gate)
    or "vector" (norm gains, biases, scalars).

    Embeddings and the head stay on AdamW as Muon prescribes: an embedding's rows are looked
    up one token at a time (its "gradient matrix" is a sparse sum of rows, not a linear map
    to orthogonalise), and the head maps into the vocabulary's logits. The router gate stays
    on AdamW too: it is [experts, d_model], so an orthogonalised update gives every expert's
    row a unit-size push each step whatever its gradient, which churns routing; it is small,
    so AdamW costs nothing there."""
    parts = name.split(".")
    if parts[-2:] == ["tok_embeddings", "weight"]:
        return "embed"
    if parts[-2:] == ["output", "weight"]:
        return "head"
    if "router" in parts:
        return "router"
    return "muon" if param.dim() >= 2 else "vector"


def muon_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Param groups for MuonWithAdamW: Muon at train.muon_lr for the hidden matrices, AdamW at
    train.embed_lr / train.head_lr (0: train.lr) for embeddings and head and at train.lr for
    the router and vectors. Matrices decay by train.weight_decay, vectors not at all."""
    by_role: dict[str, list] = {"muon": [], "embed": [], "head": [], "router": [], "vector": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_role[optimizer_role(name, param)].append(param)
    rates = {"muon": cfg.muon_lr, "embed": cfg.embed_lr or cfg.lr, "head": cfg.head_lr or cfg.lr,
             "router": cfg.lr, "vector": cfg.lr}
    return [{"params": params, "muon": role == "muon", "role": role, "lr": rates[role], "lr_scale": rates[role] / cfg.lr,
             "weight_decay": 0.0 if role == "vector" else cfg.weight_decay}
            for role, params in by_role.items() if params]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's rate for a step whose train.lr-scheduled rate is `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]

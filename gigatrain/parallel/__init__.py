"""Parallelism applied from outside to an unmodified model.

The order follows the recipe that composes cleanly with PyTorch's distributed
stack: tensor/sequence parallel, then activation checkpointing, then compile,
then data-parallel sharding. One process needs only the middle two; the
multi-process axes plug in here without the model changing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from gigatrain.config import Config


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """'full' recomputes every block in the backward pass; 'selective' every other block,
    trading half the activation memory saving for less recompute."""
    if mode == "none":
        return
    for index, (name, block) in enumerate(model.layers.named_children()):
        if mode == "full" or index % 2 == 0:
            # The wrapper's state-dict hooks strip its prefix, so checkpoint names are unchanged.
            model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place: the blocks share one graph, names stay unchanged, and
    compile time does not grow with depth."""
    for block in model.layers.values():
        block.compile()


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        apply_compile(model)
    return model


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1

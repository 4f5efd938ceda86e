"""The training objective, beside the model it scores: every floor above (the parallel
layouts, evaluation, the trainer) computes the same loss from here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over (batch, seq, vocab) logits, in nats per token."""
    # fp32 cross-entropy: bf16 log-softmax over a large vocabulary loses precision.
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

"""The training objective, beside the model it scores: every floor above (the parallel
layouts, evaluation, the trainer) computes the same loss from here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default: evaluation pads its batches with it

# Above this many logits (batch x seq x vocab), the loss goes through chunks of tokens: the
# plain path holds an fp32 copy of every logit, its fp32 log-softmax for the backward and an fp32
# gradient, while the chunks hold only one chunk's fp32 values at a time. It is a trade of speed
# for memory: on an H100 (torch 2.11, llama3-1b with its 128,256-word vocabulary, micro-batch
# 4 x 2048 = 2**30 logits, bench/gpu.py, docs/benchmarks.md) the chunks cut peak memory from 40.4
# to 32.6 GB but cost 6% of the throughput (MFU 42.0% against 44.8%). So they start where the
# plain path's fp32 copies (4 bytes each, three of them) pass 24 GB, a third of an H100: a
# micro-batch that size needs the memory more than the 6%. Below it the plain path stays; the
# two agree to rounding, not bit for bit (a log-sum-exp against log_softmax, another order of
# summation), so the small models' per-step losses that tests/golden_losses.json fixes never move.
CHUNKED_MIN_LOGITS = 2**31
# fp32 values per chunk: bounds the temporaries (each about this many floats, a few at a time).
CHUNK_LOGITS = 2**26


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of [tokens, vocab] logits, one chunk of tokens at a time in fp32.

    The forward keeps only each token's log-sum-exp (one float per token) besides the logits
    themselves; the backward recomputes each chunk's softmax from them and writes the
    gradient in the logits' own dtype, so no fp32 tensor of the whole batch ever exists."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        tokens = logits.shape[0]
        losses = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        lse = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            values, target = logits[rows].float(), targets[rows]
            chunk_lse = torch.logsumexp(values, dim=-1)
            picked = values.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            losses[rows] = torch.where(target != IGNORE_INDEX, chunk_lse - picked, 0.0)
            lse[rows] = chunk_lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_tokens = chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            target = targets[rows]
            # d(lse - x_t)/dx = softmax(x) - onehot(t); padding rows get no gradient.
            probs = logits[rows].float().sub_(lse[rows].unsqueeze(1)).exp_()
            probs.scatter_add_(1, target.clamp(min=0).unsqueeze(1), probs.new_full((probs.shape[0], 1), -1.0))
            scale = torch.where(target != IGNORE_INDEX, grad_losses[rows], 0.0)
            grad[rows] = probs.mul_(scale.unsqueeze(1))
        return grad, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                          chunk_logits: int | None = None) -> torch.Tensor:
    """F.cross_entropy over [tokens, vocab] logits (targets of -100 ignored) in chunks of about
    `chunk_logits` fp32 values (default CHUNK_LOGITS): the same loss and gradient to fp32 rounding, in a fraction of
    the memory."""
    chunk_tokens = max(1, (chunk_logits or CHUNK_LOGITS) // logits.shape[-1])
    losses = _ChunkedCrossEntropy.apply(logits, targets, chunk_tokens)
    total = losses.sum()
    if reduction == "sum":
        return total
    # A tensor count: reading it on the host would stall the GPU mid-step.
    return total / (targets != IGNORE_INDEX).sum()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over (batch, seq, vocab) logits, in nats per token: in chunks of
    tokens from CHUNKED_MIN_LOGITS logits on, in one piece below."""
    if reduction in ("mean", "sum") and logits.numel() >= CHUNKED_MIN_LOGITS:
        return chunked_cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction)
    return cross_entropy(logits, targets, reduction)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """loss_fn in one piece, whatever the size."""
    # fp32 cross-entropy: bf16 log-softmax over a large vocabulary loses precision.
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

"""Tensor and sequence parallelism with DTensor's `parallelize_module` (Megatron layout).

Inside a block, the projections into heads and into the FFN's hidden size are split by
output column, and the projections back by input row, so each block needs one
all-gather before and one reduce-scatter after attention and the FFN. Between them,
activations (and the RMSNorms working on them) are split along the sequence, so no rank
keeps a full copy. The output head keeps its logits split over the vocabulary and the
loss is computed on the shards (loss parallel): no rank ever holds [batch, seq, vocab].

The embeddings (a vocabulary-parallel lookup) and the head (vocabulary-parallel logits)
both split their [vocab, d_model] weight by rows, Shard(0): tied, they are one and the
same sharded weight, which `parallelize` ties again once each module has been sharded.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from gigatrain.models.loss import cross_entropy, loss_fn
from gigatrain.models.moe import MoE

# An MoE layer is not split over tp (ETP=1, as in torchtitan's default; docs/moe.md): every
# tp rank gathers the block's whole sequence and runs the MoE layer on it, with plain-tensor
# weights that are the same on every tp rank and get the same gradient there; the output goes
# back to the sequence-parallel layout (each rank keeps its share: no communication), as a plain
# local tensor like the rest of the residual stream.
MOE_PLAN = {"feed_forward": PrepareModuleInputOutput(
    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
    output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)}


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a whole model or a pipeline stage of one) over `tp_mesh` in place."""
    outer = {}
    if model.tok_embeddings is not None:
        outer["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        outer["norm"] = SequenceParallel()
        # Logits stay vocabulary-sharded DTensors for loss_parallel.
        outer["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, outer)
    for block in model.layers.values():
        if block.attention.q_norm is not None:
            # QK-norm works on each head's features, and each rank holds whole heads (dim 2 of
            # [batch, seq, heads, head_dim]): its [head_dim] gains are replicated, and their
            # gradients summed over the ranks' heads.
            parallelize_module(block, tp_mesh, {
                "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
                "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            })
        if getattr(block.feed_forward, "w3", None) is not None:  # squared ReLU's MLP has no up projection
            parallelize_module(block, tp_mesh, {"feed_forward.w3": ColwiseParallel()})
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # cos and sin are plain tensors, the same on every rank.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            **(MOE_PLAN if isinstance(block.feed_forward, MoE) else {
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            }),
        })


def loss_context(tp: int):
    """Where the loss and its backward run: loss_parallel under TP, nothing otherwise."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def parallel_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """models.loss.loss_fn for the logits of any layout: under loss parallel they are a
    vocabulary-sharded DTensor, whose cross-entropy torch already computes shard by shard, so
    it never goes through the chunks (which need each token's whole row of logits)."""
    if isinstance(logits, DTensor):
        return cross_entropy(logits, targets, reduction)
    return loss_fn(logits, targets, reduction)

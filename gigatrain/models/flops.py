"""Exact parameter counts and training FLOPs per token.

One source of truth for the trainer's MFU and the cluster planner. FLOPs follow
the convention of PaLM (Chowdhery et al. 2022, appendix B), also used by
Megatron-LM, nanoGPT and torchtitan, so MFU compares with published figures:
a matmul of an [m, k] by a [k, n] matrix costs 2mkn; the backward pass costs twice
the forward; attention's two matmuls (QK^T and AV) are counted over the full
sequence, without halving for the causal mask; element-wise work (norms, softmax,
activations, rotary) and the embedding lookup are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigatrain.models.transformer import ModelArgs


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token embedding table
    attention: int  # per layer: wq, wk, wv, wo
    mlp: int  # per layer: w1, w2, w3
    norms: int  # per layer (2) plus the final norm, all layers together
    output: int  # the LM head; 0 when tied to the embedding
    total: int

    @property
    def per_layer(self) -> int:
        return self.attention + self.mlp


def param_counts(args: ModelArgs) -> ParamCounts:
    d, hd = args.d_model, args.head_dim
    embedding = args.vocab_size * d
    attention = d * args.n_heads * hd + 2 * d * args.n_kv_heads * hd + args.n_heads * hd * d
    mlp = 3 * d * args.ffn_hidden
    norms = (2 * args.n_layers + 1) * d
    output = 0 if args.tie_embeddings else args.vocab_size * d
    total = embedding + args.n_layers * (attention + mlp) + norms + output
    return ParamCounts(embedding, attention, mlp, norms, output, total)


def matmul_params(args: ModelArgs) -> int:
    """Parameters that take part in a matmul per token: every linear layer and the LM head
    (the tied head counts: its matmul runs whether or not its weight is shared)."""
    counts = param_counts(args)
    return args.n_layers * counts.per_layer + args.vocab_size * args.d_model


def forward_flops_per_token(args: ModelArgs, seq_len: int) -> int:
    dense = 2 * matmul_params(args)
    # QK^T and AV: each 2 * seq_len * head_dim per head per token.
    attention = 2 * 2 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return dense + attention


def training_flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Forward plus backward (2x forward): 6N + 12 * layers * heads * head_dim * seq_len."""
    return 3 * forward_flops_per_token(args, seq_len)

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
    mlp: int  # per dense layer: w1, w2, w3 (squared ReLU: w1, w2)
    norms: int  # per layer (2, and QK-norm's 2) plus the final norm, all layers together
    output: int  # the LM head; 0 when tied to the embedding
    total: int
    n_layers: int = 0
    moe: int = 0  # per MoE layer: the router, every routed expert and the shared experts
    moe_active: int = 0  # per MoE layer, what one token goes through: the router, its top_k experts, the shared ones
    n_moe_layers: int = 0
    active: int = 0  # what one token goes through: total less the routed experts it skips

    @property
    def per_layer(self) -> int:
        """A layer's attention and MLP (or experts), on average over the layers."""
        return self.attention + (self.n_dense_layers * self.mlp + self.n_moe_layers * self.moe) // self.n_layers

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers


def param_counts(args: ModelArgs) -> ParamCounts:
    d, hd = args.d_model, args.head_dim
    embedding = args.vocab_size * d
    attention = d * args.n_heads * hd + 2 * d * args.n_kv_heads * hd + args.n_heads * hd * d
    mlp = (3 if args.gated_mlp else 2) * d * args.ffn_hidden
    n_moe_layers = sum(args.is_moe_layer(layer) for layer in range(args.n_layers))
    expert = 3 * d * args.moe_hidden
    router_and_shared = d * args.n_experts + args.n_shared_experts * expert if n_moe_layers else 0
    moe = router_and_shared + args.n_experts * expert if n_moe_layers else 0
    moe_active = router_and_shared + args.top_k * expert if n_moe_layers else 0
    # Two per layer and the final one over d_model; QK-norm's two over head_dim per layer.
    norms = (2 * args.n_layers + 1) * d + (2 * args.n_layers * hd if args.qk_norm else 0)
    output = 0 if args.tie_embeddings else args.vocab_size * d
    dense_layers = args.n_layers - n_moe_layers
    total = embedding + args.n_layers * attention + dense_layers * mlp + n_moe_layers * moe + norms + output
    active = total - n_moe_layers * (moe - moe_active)
    return ParamCounts(embedding, attention, mlp, norms, output, total, args.n_layers, moe, moe_active, n_moe_layers, active)


def matmul_params(args: ModelArgs) -> int:
    """Parameters that take part in a matmul per token: every linear layer a token goes through
    (for an MoE layer: the router, its top_k experts and the shared experts) and the LM head (the
    tied head counts: its matmul runs whether or not its weight is shared)."""
    counts = param_counts(args)
    return (args.n_layers * counts.attention + counts.n_dense_layers * counts.mlp + counts.n_moe_layers * counts.moe_active
            + args.vocab_size * args.d_model)


def forward_flops_per_token(args: ModelArgs, seq_len: int) -> int:
    dense = 2 * matmul_params(args)
    # QK^T and AV: each 2 * seq_len * head_dim per head per token.
    attention = 2 * 2 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return dense + attention


def training_flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Forward plus backward (2x forward): 6N + 12 * layers * heads * head_dim * seq_len."""
    return 3 * forward_flops_per_token(args, seq_len)

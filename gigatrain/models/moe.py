"""Mixture of experts: a feed-forward layer of many gated MLPs, each token sent to top_k of them.

Token-choice top-k routing (Switch, Mixtral, DeepSeek-V3, Qwen3): the router scores every
expert for every token (softmax or sigmoid), each token goes to its k best, and its output is
the weighted sum of their outputs. Dropless: no capacity limit, every token reaches all k of
its experts, however unbalanced the routing. Tokens are sorted by expert so that each expert
runs one matmul over all its tokens (`GroupedExperts`); no loop runs over tokens.

The routed experts' weights are stacked, one [experts, ...] tensor per projection, so that
expert parallelism can split them along the first dimension and a grouped matmul can run them
at once. Like the rest of models/, nothing here knows of parallelism: expert parallelism
(parallel/) wraps `MoE.experts`, whose forward takes tokens already sorted by expert and the
number for each, and sends them to the ranks that hold their experts and back.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from gigatrain.models.transformer import ModelArgs


def gate_activation(name: str):
    """The gated MLPs' activation (dense and experts alike) by its ModelArgs name."""
    return F.silu if name == "silu" else partial(F.gelu, approximate="tanh")


class Router(nn.Module):
    """Scores the experts for each token and chooses its top_k."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = nn.Linear(args.d_model, args.n_experts, bias=False)
        self.top_k, self.score_fn, self.route_norm = args.top_k, args.router_score, args.route_norm
        # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores when
        # choosing experts, never when weighting them; moved after each optimizer step towards
        # the under-used experts. Persistent: it is learned state, checkpointed with the model.
        self.register_buffer("expert_bias", torch.zeros(args.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [tokens, d_model] -> (weights [tokens, k] fp32, chosen experts [tokens, k], scores [tokens, experts] fp32)."""
        # fp32 scores: under bf16 near-ties between experts would flip with rounding.
        logits = self.gate(x).float()
        scores = logits.softmax(dim=-1) if self.score_fn == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.route_norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen, scores

    @torch.no_grad()
    def init_buffers(self) -> None:
        self.expert_bias.zero_()


def grouped_mm_runs(x: torch.Tensor, hidden: int) -> bool:
    """Whether `torch._grouped_mm` should run experts on x [tokens, d_model] with this hidden size.

    Where it is fast: CUDA on Hopper (sm90) or newer, bf16, as torchtitan runs it. Its CUDA kernel
    needs each row of x, of the hidden activations and of the weights to span a multiple of 16
    bytes; the groups' row counts need no alignment and may be 0 (torch 2.11, H100). Elsewhere
    the loop: torch's CPU `_grouped_mm` (2.11, 2.13) gives the loop's very numbers but runs a
    loop of its own, 1.2 to 4 times slower than ours (2 cores, tiny-moe to d_model 256)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] > 0
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and (x.shape[-1] * x.element_size()) % 16 == 0 and (hidden * x.element_size()) % 16 == 0)


class GroupedExperts(nn.Module):
    """n_experts gated MLPs with stacked weights: w1 (gate) and w3 (up) [experts, hidden, d_model],
    w2 (down) [experts, d_model, hidden]; each expert's slice is laid out as an nn.Linear weight."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.activation = gate_activation(activation)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
        """x [tokens, d_model], sorted by expert (the first tokens_per_expert[0] rows go to this
        module's expert 0, and so on) -> each token's output from its expert, [tokens, d_model].

        grouped: one grouped matmul per projection (True) or a loop over the experts (False);
        None chooses from x's device and dtype (`grouped_mm_runs`). Both give the same numbers
        up to the rounding of the matmuls' sums."""
        if grouped is None:
            grouped = grouped_mm_runs(x, self.w1.shape[1])
        if grouped:
            return self._grouped(x, tokens_per_expert)
        return self._loop(x, tokens_per_expert)

    def _grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # Each expert's last row + 1, on the device: no host sync, unlike the loop's split sizes.
        ends = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        gate = torch._grouped_mm(x, self.w1.transpose(-2, -1), offs=ends)
        up = torch._grouped_mm(x, self.w3.transpose(-2, -1), offs=ends)
        return torch._grouped_mm(self.activation(gate) * up, self.w2.transpose(-2, -1), offs=ends)

    # Left out of torch.compile: the split sizes are read on the host (a graph break), and a
    # compiled loop would specialise on them and recompile for every new routing.
    @torch.compiler.disable
    def _loop(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        outputs = []
        # The split sizes must be known on the host: a sync on an accelerator.
        for expert, tokens in enumerate(torch.split(x, tokens_per_expert.tolist())):
            hidden = self.activation(tokens @ self.w1[expert].T) * (tokens @ self.w3[expert].T)
            outputs.append(hidden @ self.w2[expert].T)
        return torch.cat(outputs)


class MoE(nn.Module):
    """The routed experts, and beside them optional always-on shared experts (DeepSeek, Qwen, Llama 4)."""

    def __init__(self, args: ModelArgs, shared_experts: nn.Module | None = None):
        super().__init__()
        self.n_experts, self.top_k = args.n_experts, args.top_k
        self.router = Router(args)
        self.experts = GroupedExperts(args.n_experts, args.d_model, args.moe_hidden, args.mlp_activation)
        self.shared_experts = shared_experts
        # Tokens routed to each expert since the last optimizer step (balancing, statistics).
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen, scores = self.router(x)
        counts = torch.bincount(chosen.flatten(), minlength=self.n_experts)
        self._record(counts)
        # Sort the (token, choice) pairs by expert; a stable sort keeps each expert's tokens in
        # token order, so every layout sees the same order.
        order = chosen.flatten().argsort(stable=True)
        routed = self.experts(x[order // self.top_k], counts)
        routed = routed[order.argsort()].view(-1, self.top_k, shape[-1])
        # Combined by a sum over each token's k outputs (not an index_add: the same on every device).
        out = (routed * weights.unsqueeze(-1)).sum(dim=1).type_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    @torch.no_grad()
    def _record(self, counts: torch.Tensor) -> None:
        # Activation checkpointing runs this forward again inside the backward: count once.
        if torch._C._current_graph_task_id() == -1:
            self.tokens_per_expert += counts

    @torch.no_grad()
    def init_buffers(self) -> None:
        self.tokens_per_expert.zero_()

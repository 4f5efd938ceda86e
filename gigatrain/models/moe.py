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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's where it is on (autocast does not cover
    torch._grouped_mm, and x, the normed residual stream, is fp32 there), else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_mm_runs(x: torch.Tensor, hidden: int) -> bool:
    """Whether `torch._grouped_mm` should run experts on x [tokens, d_model] with this hidden size.

    Where it is fast: CUDA on Hopper (sm90) or newer, bf16, as torchtitan runs it. Its CUDA kernel
    needs each row of x, of the hidden activations and of the weights to span a multiple of 16
    bytes; the groups' row counts need no alignment and may be 0 (torch 2.11, H100). Elsewhere
    the loop: torch's CPU `_grouped_mm` (2.11, 2.13) gives the loop's very numbers but runs a
    loop of its own, 1.2 to 4 times slower than ours (2 cores, tiny-moe to d_model 256)."""
    dtype = compute_dtype(x)
    size = torch.finfo(dtype).bits // 8
    return (x.is_cuda and dtype == torch.bfloat16 and x.shape[0] > 0
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and (x.shape[-1] * size) % 16 == 0 and (hidden * size) % 16 == 0)


class GroupedExperts(nn.Module):
    """n_experts gated MLPs with stacked weights: w1 (gate) and w3 (up) [experts, hidden, d_model],
    w2 (down) [experts, d_model, hidden]; each expert's slice is laid out as an nn.Linear weight."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.activation = gate_activation(activation)
        _leave_loop_out_of_compile()

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
        dtype = compute_dtype(x)
        x = x.to(dtype)
        w1, w3, w2 = (w.to(dtype).transpose(-2, -1) for w in (self.w1, self.w3, self.w2))
        gate = torch._grouped_mm(x, w1, offs=ends)
        up = torch._grouped_mm(x, w3, offs=ends)
        return torch._grouped_mm(self.activation(gate) * up, w2, offs=ends)

    def _loop(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return _expert_loop_outside_compile(self, x, tokens_per_expert)


# `_expert_loop` wrapped by torch.compiler.disable, made by the first GroupedExperts rather than
# at import: the wrapper imports torch._dynamo (over a second), which a process that never
# builds an MoE must not pay. Made in eager code, never inside a compiled region: there dynamo
# would have to trace the making of the wrapper itself.
_expert_loop_outside_compile = None


def _leave_loop_out_of_compile() -> None:
    global _expert_loop_outside_compile
    if _expert_loop_outside_compile is None:
        _expert_loop_outside_compile = torch.compiler.disable(_expert_loop)


def _expert_loop(experts: GroupedExperts, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The experts one after another over their sorted tokens. Left out of torch.compile: the
    split sizes are read on the host (a graph break), and a compiled loop would specialise on
    them and recompile for every new routing."""
    outputs = []
    # Slices by unbind, not by indexing: the backward of w[e] zero-fills a whole stack's
    # gradient and adds into it once per expert (on an H100, 40% of a Mixtral layer's step
    # time); unbind's backward stacks the experts' gradients once.
    weights = zip(experts.w1.unbind(0), experts.w3.unbind(0), experts.w2.unbind(0))
    # The split sizes must be known on the host: a sync on an accelerator.
    for (w1, w3, w2), tokens in zip(weights, torch.split(x, tokens_per_expert.tolist())):
        hidden = experts.activation(tokens @ w1.T) * (tokens @ w3.T)
        outputs.append(hidden @ w2.T)
    return torch.cat(outputs)


class _GatherRows(torch.autograd.Function):
    """rows[index] whose backward is a gather too: index maps each output row to its source
    row, and each source row is read by `fan_out` output rows, whose positions in the output
    `inverse` lists ([source rows, fan_out] flattened). Autograd's own backward of an
    indexing zero-fills the source's shape and scatter-adds into it, which is slower and on
    a GPU not deterministic; a permutation's inverse makes the backward a plain read and,
    with fan_out > 1, a sum in a fixed order."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, fan_out: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.fan_out = fan_out
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_rows = grad.index_select(0, inverse)
        if ctx.fan_out > 1:
            grad_rows = grad_rows.view(-1, ctx.fan_out, grad.shape[-1]).sum(dim=1)
        return grad_rows, None, None, None


class AddAuxiliaryLoss(torch.autograd.Function):
    """The identity on a layer's output whose backward also feeds `weight` as the gradient of
    `aux` (DeepSeek's AddAuxiliaryLoss): the balancing loss reaches the router's gradients
    through whichever backward runs the layer (a plain loss.backward(), a pipeline stage's,
    an activation-checkpointed recompute) without being added to the reported loss."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, torch.full((), ctx.weight, dtype=torch.float32, device=grad_out.device), None


class MoE(nn.Module):
    """The routed experts, and beside them optional always-on shared experts (DeepSeek, Qwen, Llama 4)."""

    def __init__(self, args: ModelArgs, shared_experts: nn.Module | None = None):
        super().__init__()
        self.n_experts, self.top_k = args.n_experts, args.top_k
        self.aux_loss_coef = args.aux_loss_coef
        self.router = Router(args)
        self.experts = GroupedExperts(args.n_experts, args.d_model, args.moe_hidden, args.mlp_activation)
        self.shared_experts = shared_experts
        # Set by parallel/ (ParallelModel), which knows the layout; one process leaves them be.
        # aux_grad_scale: the balancing loss's share of the step's gradient, as the language-model
        # loss's (1 / micro-batches where the loop divides the loss; 1 where a pipeline schedule
        # scales the gradients itself). sequence_reduce: sums per-sequence counts over the ranks
        # that hold other tokens of the same sequences (context parallelism); None: none do.
        self.aux_grad_scale = 1.0
        self.sequence_reduce = None
        # Training forwards to leave out of the statistics: parallel/ sets it where a pipeline
        # stage runs a forward of its own, on probe inputs, before the first step's micro-batches.
        self.uncounted_forwards = 0
        # Since the last optimizer step (balancing, statistics): the (token, choice) pairs routed
        # to each expert, and the sum of the per-sequence balance losses with their sequences.
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_experts), persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen, scores = self.router(x)
        # A count into n_experts zeros, not bincount: bincount's output size depends on the data,
        # which breaks torch.compile's graph at every MoE layer.
        flat = chosen.flatten()
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        # Sort the (token, choice) pairs by expert; a stable sort keeps each expert's tokens in
        # token order, so every layout sees the same order. `position` is its inverse: where
        # each pair sits in the sorted order.
        order = chosen.flatten().argsort(stable=True)
        position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        routed = self.experts(_GatherRows.apply(x, order // self.top_k, position, self.top_k), counts)
        routed = _GatherRows.apply(routed, position, order, 1).view(-1, self.top_k, shape[-1])
        # Combined by a sum over each token's k outputs (not an index_add: the same on every device).
        out = (routed * weights.unsqueeze(-1)).sum(dim=1).type_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        training = self.training and torch.is_grad_enabled()
        aux = None
        if training and self.aux_loss_coef > 0:
            batch = shape[0] if len(shape) == 3 else 1
            aux = self.sequence_balance_loss(chosen.view(batch, -1, self.top_k), scores.view(batch, -1, self.n_experts))
            out = AddAuxiliaryLoss.apply(out, aux.mean(), self.aux_loss_coef * self.aux_grad_scale)
        if training:
            self._record(counts, aux)
        return out.view(shape)

    def sequence_balance_loss(self, chosen: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The load-balancing loss of each sequence, unweighted: [batch] of E * sum_e f_e * P_e,
        f_e the fraction of the sequence's (token, choice) pairs routed to e (a constant), P_e
        the mean probability of e over the sequence's tokens; 1.0 is perfect balance.

        Per sequence (DeepSeek-V3's sequence-wise loss, Switch/Mixtral's formula): data
        parallelism and micro-batches split a batch between sequences, never inside one, so
        each sequence's loss, and the batch mean, are the same under every layout. Context
        parallelism splits sequences: f comes from the whole sequence's summed counts, and P
        from this shard's tokens, so the shards' losses average (as their gradients do) to the
        whole sequence's."""
        with torch.no_grad():
            pairs = torch.zeros(chosen.shape[0], self.n_experts, device=chosen.device)
            pairs.scatter_add_(1, chosen.flatten(1), torch.ones_like(chosen.flatten(1), dtype=pairs.dtype))
            if self.sequence_reduce is not None:
                pairs = self.sequence_reduce(pairs)
            fraction = pairs / pairs.sum(dim=-1, keepdim=True)
        # Sigmoid scores do not sum to one: normalised per token, as DeepSeek-V3 does.
        probs = scores if self.router.score_fn == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        return self.n_experts * (fraction * probs.mean(dim=1)).sum(dim=-1)

    @torch.no_grad()
    def _record(self, counts: torch.Tensor, aux: torch.Tensor | None) -> None:
        # Activation checkpointing runs this forward again inside the backward: count once.
        if torch._C._current_graph_task_id() != -1:
            return
        if self.uncounted_forwards:
            self.uncounted_forwards -= 1
            return
        self.tokens_per_expert += counts
        if aux is not None:
            self.aux_loss_sum[0] += aux.sum()
            self.aux_loss_sum[1] += aux.numel()

    @torch.no_grad()
    def reset_statistics(self) -> None:
        self.tokens_per_expert.zero_()
        self.aux_loss_sum.zero_()

    @torch.no_grad()
    def init_buffers(self) -> None:
        self.reset_statistics()

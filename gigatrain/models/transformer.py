"""A decoder-only transformer of the Llama 3 family.

RMSNorm, rotary position embeddings, grouped-query attention through
``scaled_dot_product_attention`` (flash kernels on GPU), a SwiGLU MLP and
optional tied embeddings. The model knows nothing of parallelism, devices or
losses: ``forward`` maps token ids to logits, and everything else (sharding,
compile, mixed precision, the loss) is applied from outside.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gigatrain.models.moe import MoE, gate_activation


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a model; presets.py names the common ones."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Llama 3.1's rotary scaling ("llama3" in transformers), which stretched an 8192-token
    # model to max_seq_len: long wavelengths slowed by rope_scaling_factor, short ones kept,
    # those between blended. A factor of 1 is no scaling: the plain rotary frequencies.
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    # The MLP's activation: silu (SwiGLU, Llama) or gelu (GeGLU, tanh approximation: Grok-1),
    # both gated (w2(act(w1 x) * w3 x)); or relu2, squared ReLU, not gated (w2(relu(w1 x)^2),
    # no w3: Primer, modded-nanogpt, nanochat), two matrices instead of three.
    mlp_activation: str = "silu"
    # Attention logits capped at +-c by c * tanh(x / c) before the softmax (Grok-1: 30); 0: none.
    attn_softcap: float = 0.0
    # RMSNorm over each head's query and key features before rotary (Qwen3, OLMo 2): keeps the
    # attention logits bounded without a soft cap.
    qk_norm: bool = False
    # Features per attention head; 0: d_model // n_heads. Qwen3-30B-A3B: 32 heads of 128 on a
    # d_model of 2048, so its projections into heads are wider than d_model.
    head_dim_override: int = 0
    # Output logits capped at +-c by c * tanh(x / c) after the head (Gemma 2: 30, nanochat: 15); 0: none.
    logit_softcap: float = 0.0
    # The residual branches' output projections (attention.wo, the MLPs' and experts' w2) start
    # at zero (modded-nanogpt, nanochat): every block starts as the identity.
    zero_init_residual: bool = False
    # Mixture of experts (models/moe.py); n_experts 0 or 1 is a dense model.
    n_experts: int = 0
    top_k: int = 2  # experts each token is sent to
    expert_hidden: int = 0  # each routed expert's hidden size; 0: ffn_hidden
    n_shared_experts: int = 0  # always-on experts beside the routed ones, as one MLP of n * expert_hidden
    n_dense_layers: int = 0  # the first layers keep a dense MLP (DeepSeek-V3: 3)
    moe_every: int = 1  # after those, every k-th layer is MoE (1: every one)
    router_score: str = "softmax"  # softmax | sigmoid: how a token scores the experts
    route_norm: bool = True  # the k chosen scores renormalised to sum to 1 (Mixtral, Qwen3; not Grok-1)
    aux_loss_coef: float = 0.0  # weight of the Switch/Mixtral load-balancing loss; 0: none
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing (DeepSeek-V3: 0.001); 0: none

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has experts: past the dense first layers, every moe_every-th one."""
        return self.is_moe and layer >= self.n_dense_layers and (layer - self.n_dense_layers) % self.moe_every == 0

    @property
    def moe_hidden(self) -> int:
        """Each routed expert's hidden size."""
        return self.expert_hidden or self.ffn_hidden

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLPs have a gate (w1) and an up projection (w3) multiplied together."""
        return self.mlp_activation != "relu2"

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.d_model // self.n_heads

    @property
    def rope_scaled(self) -> bool:
        return self.rope_scaling_factor != 1.0

    @property
    def pretraining_seq_len(self) -> int:
        """The context the model was pretrained at: before a rotary scaling extended it to max_seq_len."""
        return self.rope_original_max_seq_len if self.rope_scaled else self.max_seq_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations do not lose the small variances.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The rotary angular frequencies of each head's feature pairs [head_dim // 2], float64,
    with Llama 3.1's scaling where the model has one (as transformers'
    `_compute_llama3_parameters` computes it, in float64 instead of float32)."""
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not args.rope_scaled:
        return freqs
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_context = args.rope_original_max_seq_len
    wavelengths = 2 * math.pi / freqs
    # Wavelengths longer than the original context / low: slowed by the factor; shorter than
    # context / high: kept; between: a blend, smooth in the wavelength.
    slowed = torch.where(wavelengths > old_context / low, freqs / factor, freqs)
    smooth = (old_context / wavelengths - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    between = ~(wavelengths < old_context / high) & ~(wavelengths > old_context / low)
    return torch.where(between, blended, slowed)


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, each [max_seq_len, head_dim // 2]."""
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), rope_frequencies(args))
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [batch, seq, heads, head_dim] by their position's angle."""
    x_pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = x_pairs[..., 0], x_pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float) -> torch.Tensor:
    """Causal attention with the logits capped at +-softcap by softcap * tanh(x / softcap)
    (Grok-1, Gemma 2), written out: SDPA's kernels take no cap. The logits and the softmax
    in fp32, as the fused kernels accumulate."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    logits = softcap * torch.tanh(logits / softcap)
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return (probs @ v.float()).type_as(q)


class CoreAttention(nn.Module):
    """Causal softmax attention over q [batch, heads, seq, head_dim] and k, v [batch, kv_heads, ...].

    A module of its own, with no parameters, so that context parallelism can swap in a
    version that attends over the whole sequence without the model knowing."""

    def __init__(self, softcap: float = 0.0):
        super().__init__()
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            return softcapped_attention(q, k, v, self.softcap)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.d_model, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=False)
        # Per head, over its head_dim features: one [head_dim] gain shared by every head, so
        # tensor parallelism, which splits the heads, keeps a whole copy on each rank.
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.core = CoreAttention(args.attn_softcap)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:seq], sin[:seq]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, hidden: int | None = None):
        super().__init__()
        hidden = hidden or args.ffn_hidden
        self.w1 = nn.Linear(args.d_model, hidden, bias=False)  # gate (squared ReLU: up)
        # Squared ReLU has no gate: no up projection beside w1.
        self.w3 = nn.Linear(args.d_model, hidden, bias=False) if args.gated_mlp else None  # up
        self.w2 = nn.Linear(hidden, args.d_model, bias=False)  # down
        self.activation = gate_activation(args.mlp_activation) if args.gated_mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.relu(self.w1(x)).square())
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.d_model, args.norm_eps)
        if args.is_moe_layer(layer):
            shared = FeedForward(args, args.moe_hidden * args.n_shared_experts) if args.n_shared_experts else None
            self.feed_forward = MoE(args, shared)
        else:
            self.feed_forward = FeedForward(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


def parameter_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """Each parameter draws from its own stream, named by (seed, parameter name): a rank that
    holds a shard of a parameter can draw the very numbers one process would, whatever the
    layout and whatever else it holds."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % 2**63)
    return generator


@torch.no_grad()
def init_parameter(name: str, tensor: torch.Tensor, args: ModelArgs, generator: torch.Generator) -> None:
    """The initial value of the parameter called `name` (its name in the whole model): norm
    gains 1, matrices N(0, 0.02), with the residual-branch outputs scaled by 1/sqrt(2 L) so
    the residual stream's variance does not grow with depth (GPT-2 / Llama recipe), or zero
    with zero_init_residual."""
    if name.endswith("norm.weight"):
        tensor.fill_(1.0)
        return
    std = 0.02
    # A routed expert's down projection is one [experts, d_model, hidden] tensor: each expert's
    # slice gets the same scale as a dense MLP's, since a token's output is a weighted mean of
    # its k experts' outputs.
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "experts.w2", "shared_experts.w2.weight")):
        if args.zero_init_residual:
            # The gradients still reach them (they multiply nonzero activations), so they
            # learn from the first step; the matrices before them start learning one step later.
            tensor.zero_()
            return
        std /= math.sqrt(2 * args.n_layers)
    tensor.normal_(0.0, std, generator=generator)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, seed: int = 0):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.d_model)
        # A ModuleDict keyed by layer index keeps fully-qualified names stable when a
        # pipeline stage deletes the layers it does not own (and sets the embeddings or
        # the head to None when another stage owns them).
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.output = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.tie_weights()
        # Not persistent: derived from the shape, so checkpoints hold only learned state.
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)
        if self.rope_cos.device.type != "meta":  # a meta model is initialised after it is sharded
            self.init_weights(seed)

    def tie_weights(self) -> None:
        """With tie_embeddings, make the head's weight the embeddings' own Parameter (one
        [vocab, d_model] matrix, one name in the optimizer). Whatever replaces parameters module
        by module (to_empty() from the meta device, tensor parallelism) parts the two; this
        joins them again."""
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        self.tie_weights()
        for name, param in self.named_parameters():
            init_parameter(name, param, self.args, parameter_generator(seed, name, param.device))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        cos, sin = rope_tables(self.args)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab]. A pipeline stage that starts
        inside the model takes hidden states [batch, seq, d_model] instead (floating point:
        they are not embedded), and one without the head returns them."""
        x = tokens if tokens.is_floating_point() else self.tok_embeddings(tokens)
        for block in self.layers.values():
            # The whole tables: attention takes the rows of the sequence it sees.
            x = block(x, self.rope_cos, self.rope_sin)
        x = self.norm(x) if self.norm is not None else x
        if self.output is None:
            return x
        logits = self.output(x)
        if self.args.logit_softcap:
            # In fp32, as the loss reads them: bf16's 8 bits of mantissa would round tanh's
            # flattening away near the cap. Elementwise, so vocabulary-sharded logits (tensor
            # parallelism) are capped shard by shard.
            logits = self.args.logit_softcap * torch.tanh(logits.float() / self.args.logit_softcap)
        return logits


PARAMETER_ROLES = ("embed", "head", "router", "matrix", "vector")


def parameter_role(name: str, param: torch.Tensor) -> str:
    """What the parameter called `name` (its name in the model, or in a wrapped or pipeline-stage
    copy of it) does, for an optimizer that treats each kind with its own rule and rate:
    "embed" (token embeddings, and a tied head: one weight), "head" (an untied output head),
    "router" (an MoE router's gate), "matrix" (every other matrix: attention, MLP, shared
    experts, the routed experts' stacked [experts, out, in] weights) or "vector" (norm gains).

    Embeddings are looked up a row at a time and the head maps into the vocabulary: recipes
    give both their own learning rate (nanochat, modded-nanogpt), and Muon leaves them to AdamW.
    By name and rank only, so a DTensor shard of a parameter has the role of the whole."""
    parts = name.split(".")
    if parts[-2:] == ["tok_embeddings", "weight"]:
        return "embed"
    if parts[-2:] == ["output", "weight"]:
        return "head"
    if "router" in parts:
        return "router"
    return "matrix" if param.dim() >= 2 else "vector"


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The model's trainable parameters by `parameter_role`: {role: [(name, parameter), ...]} for
    every role in PARAMETER_ROLES (empty where the model has none). A tied head is its
    embeddings' own Parameter and named_parameters() yields it once, as the embeddings."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {role: [] for role in PARAMETER_ROLES}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[parameter_role(name, param)].append((name, param))
    return groups

"""The analytical performance model: memory per GPU and time per optimizer step of one layout.

A layout is gigatrain's parallel config (dp_replicate x dp_shard x tp x pp x cp, torchtitan's
mesh order with tp innermost) plus the choices that go with it: micro-batch size, pipeline
schedule and activation recompute. The model is a roofline per transformer layer:

  compute    matmul FLOPs at the accelerator's sustained matmul efficiency, attention FLOPs
             (halved: causal flash kernels skip the masked half) at the attention efficiency;
  memory     element-wise traffic (norms, rotary, SwiGLU, residual adds, casts) and the weight
             traffic of each micro-batch, at a fraction of HBM bandwidth;
  comm       TP all-gathers/reduce-scatters (sequence parallel), CP all-gathers of K and V,
             FSDP all-gather/reduce-scatter and HSDP all-reduce over the scale-out network,
             pipeline sends; ring collectives at a fraction of link bandwidth plus a latency
             per ring step; FSDP/HSDP and CP traffic overlaps compute, TP traffic does not;
  pipeline   the bubble of each schedule: (pp-1) micro-batch times for GPipe and 1F1B,
             (pp-1)/v for Interleaved1F1B and LoopedBFS with v stages per rank, (pp-1)/(3v)
             for InterleavedZeroBubble (ZB-H1's third, interleaved over v stages).

Layouts use the config's names (parallel.*, train.micro_batch_size,
train.activation_checkpointing, PyTorch's pipeline schedule names), so a layout the planner
picks is a layout the trainer runs, and "selective" means the same op-level recompute in both.

FLOP counts come from gigatrain.models.flops (the PaLM convention the trainer's MFU uses): for
a mixture of experts they count the ACTIVE parameters (attention, router, a token's top_k experts,
shared experts), so MFU is on active FLOPs as published MoE figures report it.

Mixture of experts. `ep` (expert parallel) does not multiply the GPU count: as in torchtitan, the
EP group is carved from the dp_shard x cp ranks, next to tp in the mesh (pp, dp_replicate,
dp_shard, cp, tp), so an EP group spans ep x tp consecutive ranks. Each EP rank holds
n_experts/ep experts (split over tp like a dense MLP); FSDP shards them over the
efsdp = dp_shard x cp / ep ranks outside the EP group. An MoE layer adds:
  all-to-all  dispatch and combine, forward and backward: 4 x tokens x top_k x d_model x bytes
             per TP rank (sequence parallel: each TP rank routes its 1/tp of the tokens), of which
             (ep-1)/ep leaves the rank; NVLink for the peers in the rank's NVLink domain, the
             scale-out NIC for the rest; not overlapped (Efficiency.ep_overlap, default 0);
  imbalance  the slowest EP rank's routed-expert GEMMs take expert_imbalance x the mean;
  memory     top_k copies of each token's hidden in the experts, and the experts' weights,
             gradients and optimizer state divided by ep x efsdp (see expert_state below).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from gigatrain.config import DEGREES, MULTI_STAGE_SCHEDULES
from gigatrain.models.flops import matmul_params, param_counts, training_flops_per_token
from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import Accelerator

GB = 1e9
NVLINK_LATENCY_S = 1e-6  # per ring step inside an NVLink domain (NCCL LL/LL128 protocols)
MEMORY_RESERVE_GB = 2.0  # CUDA context, NCCL and cuBLAS workspaces
MEMORY_USABLE = 0.95  # share of HBM the caching allocator can use before fragmentation bites
SCORE_PASSES = 10  # unfused attention: QK^T write, softmax read+write, mask, dropout, AV read; x2 for backward
OPTIMIZER_BYTES_PER_PARAM = 32  # AdamW in fp32: read param, grad, m, v; write param, m, v; grad-norm read


@dataclass(frozen=True)
class Workload:
    """What is trained: the model shape, sequence length and global batch (sequences per step)."""

    model: ModelArgs
    seq_len: int
    global_batch: int
    precision: str = "bf16"  # which peak the compute runs at: bf16 or fp8
    act_bytes: int = 2  # bytes per activation element: 2 under bf16 autocast, 4 for fp32 (CPU)
    flash_attention: bool = True  # False: scores are materialised (pre-2022 kernels, e.g. Megatron 2021)
    sequence_parallel: bool = True  # False: norms and residuals run unsharded on every TP rank (pre-2022 Megatron)
    # True: "selective" is gigatrain's (torchtitan's) op-level policy, which keeps every matmul
    # output; False: Megatron's selective recompute (Korthikanti et al.), which keeps the
    # residual stream instead of the output projections' unreduced outputs (published runs).
    op_level_selective: bool = True

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch

    @property
    def flops_per_token(self) -> int:
        return _training_flops_per_token(self.model, self.seq_len)


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    micro_batch_size: int = 1
    pp_schedule: str = "1F1B"  # one of config.PP_SCHEDULES (PyTorch's names); ignored when pp == 1
    pp_stages_per_rank: int = 1  # model chunks per pipeline rank (the multi-stage schedules)
    activation_checkpointing: str = "none"  # none | selective (op-level) | full
    ep: int = 1  # expert parallel, carved from dp_shard x cp (does not multiply the GPU count); 1 for dense

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in DEGREES}

    def describe(self) -> str:
        """Compact: 'dp2x64 ep8 tp8 pp7:int9 cp2 mbs1 rc=selective' (dp replicate x shard; ep within dp_shard x cp)."""
        dp = f"dp{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"dp{self.dp_shard}"
        parts = [dp]
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        if self.pp > 1:
            schedule = {"Interleaved1F1B": "int", "InterleavedZeroBubble": "zb", "LoopedBFS": "bfs"}.get(
                self.pp_schedule, self.pp_schedule.lower())
            if self.pp_schedule in MULTI_STAGE_SCHEDULES:
                schedule += str(self.pp_stages_per_rank)
            parts.append(f"pp{self.pp}:{schedule}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        parts.append(f"mbs{self.micro_batch_size}")
        if self.activation_checkpointing != "none":
            parts.append(f"ac={self.activation_checkpointing}")
        return " ".join(parts)


@dataclass(frozen=True)
class Efficiency:
    """The model's free factors. Defaults are justified in docs/planner.md; --calibrate fits them.

    matmul and attention default to the accelerator's catalog figures when None; the catalog's
    matmul figure is a best-shape benchmark, which GEMMs at training shapes reach only
    matmul_derate of (fit once to published runs, see docs/planner.md).
    """

    matmul: float | None = None  # sustained fraction of peak FLOP/s in GEMMs at training shapes
    attention: float | None = None  # fraction of peak in fused attention, forward + backward
    matmul_derate: float = 0.80  # training-shape GEMMs vs the catalog's best-shape benchmark
    memory: float = 0.8  # fraction of HBM bandwidth reached by memory-bound kernels (STREAM-like)
    elementwise_passes: float = 8.0  # reads+writes of every stored activation element, fwd+bwd
    collective_scaleup: float = 0.8  # fraction of NVLink bandwidth NCCL rings reach
    collective_scaleout: float = 0.9  # fraction of InfiniBand/RoCE line rate NCCL rings reach
    overlap: float = 0.95  # share of FSDP/HSDP and CP traffic hidden behind compute
    tp_overlap: float = 0.0  # share of TP traffic hidden (async TP would raise it)
    layer_overhead_s: float = 0.0  # launch/dispatch time per layer per micro-batch (matters on CPU)
    step_overhead_s: float = 0.0  # fixed time per optimizer step (data, logging, syncs)
    # Slowest EP rank's routed-expert work over the mean (docs/planner.md, "Mixture of experts").
    expert_imbalance: float = 1.1
    ep_overlap: float = 0.0  # share of the MoE all-to-all hidden behind compute (DualPipe-style schedules)

    def resolve(self, gpu: Accelerator) -> "Efficiency":
        return replace(self, matmul=self.matmul if self.matmul is not None else gpu.matmul_efficiency * self.matmul_derate,
                       attention=self.attention if self.attention is not None else gpu.attention_efficiency)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Estimate:
    """One layout, evaluated: memory per GPU (GB), time per step (s) and the rates they give."""

    layout: Layout
    gpus: int
    fits: bool
    memory_gb: dict[str, float]
    time_s: dict[str, float]
    step_time_s: float
    tokens_per_s: float
    mfu: float
    hfu: float
    microbatches: int

    @property
    def memory_total_gb(self) -> float:
        return sum(self.memory_gb.values())


# -- per-token quantities of the model (one source of truth: gigatrain.models.flops) ----------
@dataclass(frozen=True)
class ModelCosts:
    layer_dense_flops: float  # training FLOPs per token of one layer's matmuls
    layer_attention_flops: float  # training FLOPs per token of one layer's QK^T and AV (PaLM count)
    head_flops: float  # training FLOPs per token of the LM head
    layer_params: int  # matmul weights of one layer
    layer_state_params: int  # plus its two norm weights: what FSDP shards and AdamW updates
    embedding_params: int
    head_params: int  # LM head weights a last pipeline stage holds (a copy when tied)
    kv_dim: int
    # Mixture of experts, averaged over the layers like the fields above (0 for a dense model):
    layer_expert_flops: float = 0.0  # the routed experts' share of layer_dense_flops (what imbalance slows)
    layer_expert_params: float = 0.0  # routed expert weights, which EP divides
    moe_layer_share: float = 0.0  # MoE layers / all layers
    largest_layer_state_params: int = 0  # the biggest layer, which FSDP gathers whole (an MoE layer if any)
    largest_layer_expert_params: int = 0  # its routed expert weights


# The search costs tens of thousands of layouts of one model: count its parameters once.
_training_flops_per_token = lru_cache(maxsize=256)(training_flops_per_token)
_param_counts = lru_cache(maxsize=256)(param_counts)


@lru_cache(maxsize=256)
def model_costs(args: ModelArgs, seq_len: int) -> ModelCosts:
    counts = param_counts(args)
    dense = training_flops_per_token(args, 0)  # seq_len 0: the matmul-only part, 6 x matmul params
    attention = training_flops_per_token(args, seq_len) - dense
    # What one token goes through in a layer, on average: MoE layers count the router, top_k
    # routed experts and the shared ones (as flops.matmul_params does), not every expert.
    moe_share = counts.n_moe_layers / args.n_layers
    active_per_layer = counts.attention + (counts.n_dense_layers * counts.mlp + counts.n_moe_layers * counts.moe_active) / args.n_layers
    layers_share = args.n_layers * active_per_layer / matmul_params(args)
    expert = 3 * args.d_model * args.moe_hidden  # one routed expert's w1, w2, w3
    moe_layer_experts = args.n_experts * expert if counts.n_moe_layers else 0
    largest = counts.attention + max(counts.mlp if counts.n_dense_layers else 0, counts.moe if counts.n_moe_layers else 0)
    return ModelCosts(
        layer_dense_flops=dense * layers_share / args.n_layers,
        layer_attention_flops=attention / args.n_layers,
        head_flops=dense * (1 - layers_share),
        layer_params=counts.per_layer,
        layer_state_params=counts.per_layer + 2 * args.d_model,
        embedding_params=counts.embedding,
        head_params=args.vocab_size * args.d_model + args.d_model,  # with the final norm
        kv_dim=args.n_kv_heads * args.head_dim,
        layer_expert_flops=6 * moe_share * args.top_k * expert if counts.n_moe_layers else 0.0,
        layer_expert_params=moe_share * moe_layer_experts,
        moe_layer_share=moe_share,
        largest_layer_state_params=largest + 2 * args.d_model,
        largest_layer_expert_params=moe_layer_experts,
    )


def expert_state(costs: ModelCosts, layers: int, ep: int) -> tuple[float, float]:
    """(routed expert weights of `layers` layers, the part one EP rank holds): EP splits the
    experts, so a rank's share is 1/ep; FSDP then shards that share over dp_shard x cp / ep."""
    experts = layers * costs.layer_expert_params
    return experts, experts / ep


def activation_elements(args: ModelArgs, kv_dim_per_rank: float, tp: int, recompute: str, score_len: int = 0,
                        sequence_parallel: bool = True, op_level_selective: bool = True, ffn: float | None = None) -> float:
    """Activation elements one layer keeps per token for its backward, per TP rank.

    With sequence parallelism every stored tensor is split over tp (Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models", table 2), and flash
    attention keeps no seq x seq scores. Per token, for a Llama block:
      none       attention: norm input, normed input, q, k, v, attention output (4h + 2kv)
                 MLP: norm input, normed input, gate, up, silu(gate), product (2h + 4f)
      selective  op-level, as the trainer runs it (parallel.apply_activation_checkpointing): keep
                 the layer input and every matmul and attention output, recompute norms, rotary,
                 SwiGLU's element-wise ops and residual adds: the input (h), q, k, v, the
                 attention output, gate and up, and the two output projections before their
                 reduction, h wide on every TP rank (5h + 2kv + 2f without TP); under
                 sequence parallelism also their reduce-scattered copies. Megatron's selective
                 (op_level_selective=False) keeps the two residual inputs instead of the
                 projections' outputs: 4h + 2kv + 2f, /tp with SP
      full       keep only the layer input (h), recompute the whole layer in the backward
    Without flash attention (score_len = sequence length) the softmax output, dropout mask and
    dropout output add Korthikanti's 5as bytes per token, which selective recompute drops
    (the attention kernel's output is kept, not its internals).
    Without sequence parallelism the norm inputs and outputs (4h) are whole on every TP rank.
    `ffn` replaces the MLP's hidden width (an MoE layer's top_k + shared experts, see
    layer_activation_elements).
    """
    h, f = args.d_model, args.ffn_hidden if ffn is None else ffn
    per_rank_h, per_rank_f = h / tp, f / tp
    norm_h = per_rank_h if sequence_parallel else h  # residual-stream tensors around the norms
    if recompute == "full":
        return norm_h
    if recompute == "selective" and not op_level_selective:
        return 2 * norm_h + 2 * per_rank_h + 2 * kv_dim_per_rank + 2 * per_rank_f
    if recompute == "selective":
        projection_outputs = 2 * (h + (per_rank_h if tp > 1 and sequence_parallel else 0))
        return norm_h + 2 * per_rank_h + 2 * kv_dim_per_rank + 2 * per_rank_f + projection_outputs
    return 4 * norm_h + 2 * per_rank_h + 2 * kv_dim_per_rank + 4 * per_rank_f + 2.5 * args.n_heads / tp * score_len


def layer_activation_elements(args: ModelArgs, kv_dim_per_rank: float, tp: int, recompute: str, score_len: int = 0,
                              sequence_parallel: bool = True, op_level_selective: bool = True) -> float:
    """activation_elements averaged over a model's dense and MoE layers (the dense count for a dense model).

    An MoE layer's MLP part holds, per token, top_k copies of the expert MLP's tensors and the
    shared experts' (an MLP of hidden top_k x expert_hidden + shared width), plus the routed
    copies themselves: the dispatched input and the expert output of each of the top_k choices
    (2 x top_k x h per TP rank under sequence parallelism) and the router's fp32 scores (two
    elements of 2 bytes per expert). Full recompute keeps the layer input only, as for dense.
    """
    dense = activation_elements(args, kv_dim_per_rank, tp, recompute, score_len, sequence_parallel, op_level_selective)
    if not args.is_moe:
        return dense
    moe_share = _param_counts(args).n_moe_layers / args.n_layers
    width = (args.top_k + args.n_shared_experts) * args.moe_hidden
    moe = activation_elements(args, kv_dim_per_rank, tp, recompute, score_len, sequence_parallel, op_level_selective, ffn=width)
    if recompute != "full":
        per_rank_h = args.d_model / tp if sequence_parallel else args.d_model
        moe += 2 * args.top_k * per_rank_h + 2 * args.n_experts
    return dense + moe_share * (moe - dense)


# -- links --------------------------------------------------------------------------------
def link(gpu: Accelerator, span: int, eff: Efficiency) -> tuple[float, float]:
    """(achieved bandwidth B/s one direction, latency s per ring step) for a group spanning
    `span` consecutive ranks: NVLink when they fit one scale-up domain, else the scale-out NIC."""
    if span <= gpu.scaleup_domain:
        return gpu.scaleup_bw_gbs * GB * eff.collective_scaleup, NVLINK_LATENCY_S
    return gpu.scaleout_bw_gbs * GB * eff.collective_scaleout, gpu.scaleout_latency_us * 1e-6


def ring_time(bytes_per_rank: float, ranks: int, bandwidth: float, latency: float) -> float:
    """All-gather or reduce-scatter of a buffer of bytes_per_rank x ranks: each rank moves
    (ranks-1)/ranks of the whole over ranks-1 ring steps."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) * bytes_per_rank / bandwidth + (ranks - 1) * latency


def all_to_all_time(bytes_per_rank: float, ranks: int, tp: int, gpu: Accelerator, eff: Efficiency) -> float:
    """One all-to-all over an EP group of `ranks` ranks, tp apart (the group spans ranks x tp
    consecutive GPUs): each rank keeps 1/ranks of its bytes and sends the rest, split evenly over
    its peers. Peers in its NVLink domain are reached over NVLink, the others over the scale-out
    NIC, concurrently: the slower share sets the time, plus one latency."""
    if ranks <= 1:
        return 0.0
    local = min(ranks, max(1, gpu.scaleup_domain // tp))  # EP ranks in one NVLink domain, itself included
    nvlink_bw, nvlink_lat = link(gpu, 1, eff)
    fabric_bw, fabric_lat = link(gpu, gpu.scaleup_domain + 1, eff)
    over_nvlink = bytes_per_rank * (local - 1) / ranks / nvlink_bw
    over_fabric = bytes_per_rank * (ranks - local) / ranks / fabric_bw
    return max(over_nvlink, over_fabric) + (fabric_lat if ranks > local else nvlink_lat)


# -- pipeline -----------------------------------------------------------------------------
def stage_split(n_layers: int, pp: int, head_layers: float, even: bool) -> tuple[int, int]:
    """(layers on the busiest non-last stage, layers on the last stage). Even splits give every
    stage n_layers/pp; otherwise the last stage, which also runs the LM head (worth head_layers
    layers of time), gets fewer layers, as Llama 3 did for its 126 layers on 16 stages."""
    if pp == 1:
        return n_layers, n_layers
    if even:
        return n_layers // pp, n_layers // pp
    for per_stage in range(math.ceil(n_layers / pp), n_layers + 1):
        last_capacity = max(0, math.floor(per_stage - head_layers + 1e-9))
        if (pp - 1) * per_stage + last_capacity >= n_layers:
            return per_stage, max(0, n_layers - (pp - 1) * per_stage)
    return n_layers, 0


def bubble_microbatches(layout: Layout) -> float:
    """Idle time of a pipeline flush, in micro-batch times of one stage."""
    if layout.pp == 1:
        return 0.0
    if layout.pp_schedule in ("Interleaved1F1B", "LoopedBFS"):
        return (layout.pp - 1) / layout.pp_stages_per_rank
    if layout.pp_schedule == "InterleavedZeroBubble":
        # ZB-H1 (Qi et al. 2024): splitting the backward into input- and weight-gradient passes
        # fills the 1F1B bubble to about a third at the same activation memory; PyTorch's
        # schedule interleaves it over the rank's stages, which divides it as for 1F1B.
        return (layout.pp - 1) / (3 * layout.pp_stages_per_rank)
    return float(layout.pp - 1)  # GPipe and 1F1B (Narayanan et al. 2021, sec. 2.2)


def microbatches_in_flight(layout: Layout, microbatches: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at its peak."""
    if layout.pp == 1:
        return 1.0
    if layout.pp_schedule in ("GPipe", "LoopedBFS"):  # every forward before any backward
        return float(microbatches)
    in_flight = float(min(layout.pp, microbatches))
    if layout.pp_schedule in MULTI_STAGE_SCHEDULES:
        # Narayanan et al. 2021 sec. 2.2.2: (1 + (p-1)/(p v)) times the 1F1B activations.
        in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.pp_stages_per_rank)
    return in_flight


# -- the estimate -------------------------------------------------------------------------
@dataclass(frozen=True)
class PieceTime:
    """Seconds one GPU spends on one layer (or the LM head) for one micro-batch."""

    compute: float  # matmuls, attention, memory traffic, launch overhead
    tp: float  # exposed tensor-parallel communication
    cp: float  # exposed context-parallel communication
    ep: float = 0.0  # exposed expert-parallel all-to-all (MoE layers, averaged over the layers)

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.cp + self.ep


@dataclass(frozen=True)
class Context:
    """What every piece of the estimate needs, resolved once."""

    workload: Workload
    layout: Layout
    gpu: Accelerator
    eff: Efficiency
    costs: ModelCosts
    tokens: float  # tokens one GPU sees per micro-batch
    peak: float  # FLOP/s
    hbm: float  # achieved HBM bytes/s
    kv_per_rank: float  # K/V width per TP rank (kv heads replicate when tp > n_kv_heads)


def layer_time(c: Context) -> PieceTime:
    args, layout, eff, ab, tp = c.workload.model, c.layout, c.eff, c.workload.act_bytes, c.layout.tp
    full = layout.activation_checkpointing == "full"
    replay = 4 / 3 if full else 1.0  # full recompute replays the forward: 1 + 1/3 of fwd+bwd
    # Flash kernels skip the masked half of causal attention; unfused ones compute every score,
    # then write, softmax, mask and re-read the [heads, seq, seq] matrix (SCORE_PASSES times).
    causal = 0.5 if c.workload.flash_attention else 1.0
    score_len = 0 if c.workload.flash_attention else c.workload.seq_len
    attention = c.tokens * c.costs.layer_attention_flops / tp * causal * replay / (c.peak * eff.attention)
    # The slowest EP rank sets the pace of the routed experts (one rank holding every expert has no imbalance).
    imbalance = eff.expert_imbalance - 1 if layout.ep > 1 else 0.0
    matmul_flops = c.costs.layer_dense_flops + imbalance * c.costs.layer_expert_flops
    matmuls = c.tokens * matmul_flops / tp * replay / (c.peak * eff.matmul)
    stored = layer_activation_elements(args, c.kv_per_rank, tp, "none", 0, c.workload.sequence_parallel)
    elementwise = (eff.elementwise_passes * stored + SCORE_PASSES * args.n_heads / tp * score_len) * ab * c.tokens
    elementwise *= 1 + (1 / 3 if layout.activation_checkpointing != "none" else 0)  # recompute replays the element-wise ops
    local_params = c.costs.layer_params - c.costs.layer_expert_params * (1 - 1 / layout.ep)  # an EP rank's experts only
    weights = local_params / tp * (3 * ab + 8 + (ab if full else 0))  # W read fwd+bwd, dW written, fp32 accumulate
    compute = matmuls + attention + (elementwise + weights) / c.hbm + eff.layer_overhead_s

    tp_bw, tp_lat = link(c.gpu, tp, eff)
    tp_ops = 8 + (4 if full else 0)  # SP: all-gather + reduce-scatter around attention and MLP, fwd and bwd
    tp_time = tp_ops * ring_time(c.tokens * args.d_model * ab / tp, tp, tp_bw, tp_lat) * (1 - eff.tp_overlap)
    cp_bw, cp_lat = link(c.gpu, tp * layout.cp, eff)
    cp_ops = 3 + (1 if full else 0)  # gather K,V fwd; gather again and reduce-scatter dK,dV bwd
    cp_time = cp_ops * ring_time(c.tokens * 2 * c.kv_per_rank * ab, layout.cp, cp_bw, cp_lat)
    # Dispatch and combine, forward and backward (and again in full recompute's replayed forward);
    # nothing to overlap with in the layer's own data flow (router -> dispatch -> experts -> combine).
    ep_ops = 4 + (2 if full else 0)
    routed_tokens = c.tokens * args.top_k / (tp if c.workload.sequence_parallel else 1)
    ep_time = (c.costs.moe_layer_share * ep_ops * (1 - eff.ep_overlap)
               * all_to_all_time(routed_tokens * args.d_model * ab, layout.ep, tp, c.gpu, eff))
    return PieceTime(compute, tp_time, max(0.0, cp_time - eff.overlap * attention), ep_time)


def head_time(c: Context) -> PieceTime:
    """The LM head and loss on the last stage: vocab-parallel matmul, logits in fp32 for the loss."""
    args, eff, ab, tp = c.workload.model, c.eff, c.workload.act_bytes, c.layout.tp
    matmul = c.tokens * c.costs.head_flops / tp / (c.peak * eff.matmul)
    traffic = eff.elementwise_passes * 2 * ab * c.tokens * args.vocab_size / tp + c.costs.head_params / tp * (3 * ab + 8)
    tp_bw, tp_lat = link(c.gpu, tp, eff)
    tp_time = 2 * ring_time(c.tokens * args.d_model * ab / tp, tp, tp_bw, tp_lat) * (1 - eff.tp_overlap)
    return PieceTime(matmul + traffic / c.hbm + eff.layer_overhead_s, tp_time, 0.0)


def stage_params(costs: ModelCosts, args: ModelArgs, pp: int, per_stage: int, last_layers: int) -> tuple[float, float]:
    """Parameters (all ranks of TP together) of the first and the last pipeline stage."""
    if pp == 1:
        whole = args.n_layers * costs.layer_state_params + costs.head_params
        return (whole + (0 if args.tie_embeddings else costs.embedding_params),) * 2
    return (per_stage * costs.layer_state_params + costs.embedding_params,
            last_layers * costs.layer_state_params + costs.head_params)


def data_parallel_time(c: Context, params_per_rank: float, collectives: int, microbatches: int,
                       experts_per_rank: float = 0.0) -> float:
    """FSDP over dp_shard x cp (torchtitan's dp_shard_cp mesh) and HSDP's all-reduce over dp_replicate.

    FSDP all-gathers bf16 weights for the forward and again for the backward and reduce-scatters
    fp32 gradients: per micro-batch without pipeline parallelism, once per step with it (the
    stage keeps its weights gathered and its gradients unsharded between micro-batches).
    Routed experts (experts_per_rank of params_per_rank) are split over ep first: a rank gathers
    only its EP rank's 1/ep of them, over the efsdp = dp_shard x cp / ep ranks outside the EP group.
    """
    layout, ab = c.layout, c.workload.act_bytes
    shard = layout.dp_shard * layout.cp
    gathers, scatters = (2 * microbatches, microbatches) if layout.pp == 1 else (1, 1)
    seconds = 0.0
    groups = [(params_per_rank - experts_per_rank, shard, collectives)]
    if experts_per_rank:
        groups.append((experts_per_rank / layout.ep, shard // layout.ep, collectives * c.costs.moe_layer_share))
    for params, ranks, count in groups:
        if ranks > 1:
            bw, lat = link(c.gpu, layout.tp * shard, c.eff)
            seconds += (gathers * ring_time(params * ab / ranks, ranks, bw, 0.0)
                        + scatters * ring_time(params * 4 / ranks, ranks, bw, 0.0)
                        + (gathers + scatters) * count * (ranks - 1) * lat)
    r = layout.dp_replicate
    if r > 1:
        bw, lat = link(c.gpu, layout.tp * shard * r, c.eff)
        seconds += 2 * ring_time(params_per_rank * 4 / shard / r, r, bw, 0.0) + collectives * 2 * (r - 1) * lat
    return seconds


def estimate(workload: Workload, layout: Layout, gpu: Accelerator, efficiency: Efficiency = Efficiency(),
             even_stages: bool = True) -> Estimate:
    """Memory per GPU and time per optimizer step of one layout (which must divide the batch)."""
    eff = efficiency.resolve(gpu)
    args = workload.model
    tp, pp = layout.tp, layout.pp
    microbatches = workload.global_batch // (layout.dp * layout.micro_batch_size)
    c = Context(workload, layout, gpu, eff, model_costs(args, workload.seq_len),
                tokens=layout.micro_batch_size * workload.seq_len / layout.cp, peak=gpu.peak_flops(workload.precision),
                hbm=gpu.memory_bw_gbs * GB * eff.memory, kv_per_rank=max(args.n_kv_heads / tp, 1) * args.head_dim)
    layer, head = layer_time(c), head_time(c)

    # The slowest pipeline stage sets the pace; the last one also runs the head.
    per_stage, last_layers = stage_split(args.n_layers, pp, head.total / layer.total, even_stages)
    if pp == 1:
        stage_layers, with_head = args.n_layers, True
    else:
        with_head = last_layers * layer.total + head.total >= per_stage * layer.total
        stage_layers = last_layers if with_head else per_stage
    microbatch_time = stage_layers * layer.total + (head.total if with_head else 0.0)
    compute_time = microbatches * microbatch_time

    # Pipeline: the flush bubble, plus the sends on the fill/drain critical path.
    bubble = bubble_microbatches(layout) * microbatch_time
    pp_bw, pp_lat = link(gpu, tp * layout.cp * layout.dp * 2, eff)
    p2p = (c.tokens * args.d_model * workload.act_bytes / tp) / pp_bw + pp_lat  # scatter/gather: 1/tp per rank
    pp_exposed = 2 * (pp * layout.pp_stages_per_rank - 1) * p2p if pp > 1 else 0.0

    params_per_rank = max(stage_params(c.costs, args, pp, per_stage, last_layers)) / tp
    experts_per_rank = expert_state(c.costs, args.n_layers if pp == 1 else max(per_stage, last_layers), 1)[0] / tp
    dp_time = data_parallel_time(c, params_per_rank, max(per_stage, 1), microbatches, experts_per_rank)
    dp_exposed = max(dp_time - eff.overlap * compute_time, (1 - eff.overlap) * dp_time)
    shard = layout.dp_shard * layout.cp
    optimizer_time = params_per_rank / shard * OPTIMIZER_BYTES_PER_PARAM / c.hbm
    step = compute_time + bubble + pp_exposed + dp_exposed + optimizer_time + eff.step_overhead_s

    tp_part = microbatches * (stage_layers * layer.tp + (head.tp if with_head else 0.0))
    cp_part = microbatches * stage_layers * layer.cp
    ep_part = microbatches * stage_layers * layer.ep
    time_s = {"compute": compute_time - tp_part - cp_part - ep_part, "tp_comm": tp_part, "cp_comm": cp_part,
              "ep_comm": ep_part, "dp_comm": dp_exposed, "pp_comm": pp_exposed, "bubble": bubble,
              "optimizer": optimizer_time + eff.step_overhead_s}

    memory_gb = memory_breakdown(workload, layout, c.costs, per_stage, last_layers, microbatches, c.kv_per_rank)
    world, peak = layout.world_size, c.peak
    tokens_per_s = workload.tokens_per_step / step
    replayed = (c.costs.layer_attention_flops + c.costs.layer_dense_flops) / 3 if layout.activation_checkpointing == "full" else 0.0
    return Estimate(layout=layout, gpus=world, fits=sum(memory_gb.values()) <= gpu.memory_gb * MEMORY_USABLE,
                    memory_gb=memory_gb, time_s=time_s, step_time_s=step, tokens_per_s=tokens_per_s,
                    mfu=tokens_per_s * workload.flops_per_token / (world * peak),
                    hfu=tokens_per_s * (workload.flops_per_token + args.n_layers * replayed) / (world * peak),
                    microbatches=microbatches)


def memory_breakdown(workload: Workload, layout: Layout, costs: ModelCosts, per_stage: int, last_layers: int,
                     microbatches: int, kv_per_rank: float) -> dict[str, float]:
    """Peak memory of the fuller of the first and last pipeline stages, GB per GPU.

    FSDP2 mixed precision: fp32 master weights, fp32 gradients and AdamW's two fp32 states,
    all sharded over dp_shard x cp; bf16 copies of the layers being computed. Under pipeline
    parallelism gradients accumulate unsharded across micro-batches and the stage's bf16
    weights stay gathered (no resharding between micro-batches). Routed experts: a rank holds
    its EP rank's 1/ep of them, sharded over dp_shard x cp / ep, so sharded state per rank is
    the same 1/(dp_shard x cp) as for dense weights, while whatever is held unsharded (gathered
    weights, pipeline gradients, the gathered layer) holds 1/ep of the experts.
    """
    args, ab = workload.model, workload.act_bytes
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    shard = layout.dp_shard * cp
    tokens = layout.micro_batch_size * workload.seq_len / cp
    score_len = 0 if workload.flash_attention else workload.seq_len
    sp = workload.sequence_parallel
    per_layer_act = tokens * layer_activation_elements(args, kv_per_rank, tp, layout.activation_checkpointing, score_len,
                                                       sp, workload.op_level_selective) * ab
    replay_buffer = (tokens * layer_activation_elements(args, kv_per_rank, tp, "none", score_len, sp) * ab
                     if layout.activation_checkpointing != "none" else 0.0)
    logits = tokens * args.vocab_size / tp * (ab + 8)  # bf16 logits, fp32 copy and its gradient

    def stage(layers: int, params: float, in_flight: float, has_head: bool) -> dict[str, float]:
        params /= tp
        experts, local_experts = expert_state(costs, layers, layout.ep)
        held = params - (experts - local_experts) / tp  # what one rank holds unsharded: its EP rank's experts only
        weights = 4 * params / shard + (ab * held if pp > 1 and shard > 1 else 0.0)
        gradients = 4 * params / shard if pp == 1 else 4 * held
        optimizer = 8 * params / shard
        buffers = MEMORY_RESERVE_GB * GB
        if shard > 1 and pp == 1:  # two gathered layers (compute + prefetch) and one unsharded gradient
            largest = costs.largest_layer_state_params - costs.largest_layer_expert_params * (1 - 1 / layout.ep)
            buffers += largest / tp * (2 * ab + 4)
        activations = in_flight * layers * per_layer_act + replay_buffer + (logits if has_head else 0.0)
        return {"weights": weights / GB, "gradients": gradients / GB, "optimizer": optimizer / GB,
                "activations": activations / GB, "buffers": buffers / GB}

    first_params, last_params = stage_params(costs, args, pp, per_stage, last_layers)
    if pp == 1:
        return stage(args.n_layers, first_params, 1.0, True)
    first = stage(per_stage, first_params, microbatches_in_flight(layout, microbatches), False)
    last = stage(last_layers, last_params, 1.0, True)
    return max(first, last, key=lambda parts: sum(parts.values()))

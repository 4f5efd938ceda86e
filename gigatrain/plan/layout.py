"""The layout search: every valid parallel layout of a fleet, evaluated and ranked by step time.

`auto_layout` is what `gigatrain train --parallel.auto=true` calls for its world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator

from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import Accelerator, get_accelerator
from gigatrain.config import ACTIVATION_CHECKPOINTING, MULTI_STAGE_SCHEDULES, PP_SCHEDULES
from gigatrain.plan.costs import MEMORY_USABLE, Efficiency, Estimate, Layout, Workload, estimate
from gigatrain.plan.units import divisors


@dataclass(frozen=True)
class Constraints:
    """What the search may choose. A field set to a value fixes it; None lets the search pick."""

    exact_gpus: bool = True  # use exactly the fleet; False allows idle GPUs when the batch forces it
    even_stages: bool = True  # n_layers % (pp * pp_stages_per_rank) == 0, as gigatrain's pipeline needs
    tp_within_scaleup: bool = True  # keep tensor parallel inside one NVLink domain
    max_cp: int = 32
    max_micro_batch: int = 64
    dp_replicate: int | None = None
    dp_shard: int | None = None
    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    micro_batch_size: int | None = None
    pp_schedule: str | None = None
    pp_stages_per_rank: int | None = None
    activation_checkpointing: str | None = None
    ep: int | None = None

    def fixed(self) -> dict:
        names = [f.name for f in fields(Layout)]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class NoLayoutError(ValueError):
    """No layout satisfies the constraints; the message says what to change."""


def violations(workload: Workload, layout: Layout, gpu: Accelerator, gpus: int, constraints: Constraints,
               estimate: Estimate | None = None) -> list[str]:
    """Every rule the layout breaks (empty when valid). The search only returns layouts for
    which this is empty; tests check that independently of how the search enumerates."""
    args, c = workload.model, constraints
    problems = []
    world = layout.world_size
    if min(layout.degrees().values()) < 1 or min(layout.micro_batch_size, layout.pp_stages_per_rank, layout.ep) < 1:
        problems.append("degrees, micro-batch size, pipeline stages per rank and ep must be at least 1")
        return problems
    if layout.ep > 1 and not args.is_moe:
        problems.append(f"ep={layout.ep} needs a mixture-of-experts model; a dense model takes ep=1")
    if args.is_moe and args.n_experts % layout.ep:
        problems.append(f"ep={layout.ep} must divide n_experts={args.n_experts}")
    if (layout.dp_shard * layout.cp) % layout.ep:
        problems.append(f"ep={layout.ep} must divide dp_shard x cp = {layout.dp_shard * layout.cp} (the ranks it is carved from)")
    if world > gpus or (c.exact_gpus and world != gpus):
        problems.append(f"layout needs {world} GPUs, the fleet has {gpus}")
    if args.n_heads % layout.tp or args.n_kv_heads % layout.tp:
        problems.append(f"tp={layout.tp} must divide n_heads={args.n_heads} and n_kv_heads={args.n_kv_heads}")
    if c.tp_within_scaleup and layout.tp > gpu.scaleup_domain:
        problems.append(f"tp={layout.tp} exceeds the NVLink domain of {gpu.scaleup_domain}")
    chunks = layout.pp * layout.pp_stages_per_rank
    if chunks > args.n_layers or (c.even_stages and args.n_layers % chunks):
        problems.append(f"pp x stages per rank = {chunks} must {'divide' if c.even_stages else 'not exceed'} "
                        f"n_layers={args.n_layers}")
    if layout.cp > 1 and args.attn_softcap:
        problems.append(f"cp={layout.cp}: context parallelism cannot apply attn_softcap={args.attn_softcap} (use cp=1)")
    if layout.cp > 1 and workload.seq_len % (2 * layout.cp):
        problems.append(f"seq_len={workload.seq_len} must be divisible by 2 x cp = {2 * layout.cp}")
    if workload.global_batch % (layout.dp * layout.micro_batch_size):
        problems.append(f"global batch {workload.global_batch} must be divisible by dp x micro-batch = "
                        f"{layout.dp} x {layout.micro_batch_size}")
    if layout.pp_schedule not in PP_SCHEDULES or layout.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        problems.append(f"pp_schedule must be one of {PP_SCHEDULES} and activation_checkpointing one of "
                        f"{ACTIVATION_CHECKPOINTING}")
    multi = layout.pp_schedule in MULTI_STAGE_SCHEDULES
    if multi and layout.pp > 1 and layout.pp_stages_per_rank < 2:
        problems.append(f"{layout.pp_schedule} needs pp_stages_per_rank >= 2")
    if not multi and layout.pp_stages_per_rank != 1:
        problems.append(f"pp_stages_per_rank > 1 needs one of {MULTI_STAGE_SCHEDULES}")
    per_rank = workload.global_batch // max(layout.dp, 1)
    if multi and layout.pp > 1 and (per_rank // layout.micro_batch_size) % layout.pp:
        problems.append(f"{layout.pp_schedule} needs a multiple of pp micro-batches")
    for name, value in c.fixed().items():
        if getattr(layout, name) != value:
            problems.append(f"{name} is fixed to {value}")
    if estimate is not None and not estimate.fits:
        problems.append(f"needs {estimate.memory_total_gb:.1f} GB per GPU, more than "
                        f"{MEMORY_USABLE:.0%} of {gpu.memory_gb:g} GB")
    return problems


# -- enumeration ----------------------------------------------------------------------------
def _tp_choices(args: ModelArgs, gpu: Accelerator, c: Constraints) -> list[int]:
    limit = gpu.scaleup_domain if c.tp_within_scaleup else args.n_heads
    return [t for t in divisors(math.gcd(args.n_heads, args.n_kv_heads)) if t <= limit]


def _pp_choices(args: ModelArgs, c: Constraints) -> list[int]:
    if c.even_stages:
        return divisors(args.n_layers)
    powers = [2**i for i in range(int(math.log2(args.n_layers)) + 1)]
    return sorted(set(divisors(args.n_layers) + powers + list(range(1, min(args.n_layers, 16) + 1))))


def _cp_choices(args: ModelArgs, seq_len: int, c: Constraints) -> list[int]:
    if args.attn_softcap:  # gigatrain's context-parallel attention cannot soft-cap its logits (config.py refuses it)
        return [1]
    return [1] + [cp for cp in divisors(seq_len // 2) if 1 < cp <= c.max_cp] if seq_len >= 2 else [1]


def _dp_choice(global_batch: int, room: int, exact: bool) -> int | None:
    """The data-parallel degree that fills `room` GPUs: exactly, or the largest that divides the batch."""
    if exact:
        return room if global_batch % room == 0 else None
    fitting = [d for d in divisors(global_batch) if d <= room]
    return max(fitting) if fitting else None


def degree_candidates(workload: Workload, gpus: int, gpu: Accelerator, c: Constraints) -> Iterator[tuple[int, int, int, int]]:
    """(tp, pp, cp, dp) tuples worth evaluating."""
    args = workload.model
    for tp in _tp_choices(args, gpu, c):
        for pp in _pp_choices(args, c):
            for cp in _cp_choices(args, workload.seq_len, c):
                model_parallel = tp * pp * cp
                if model_parallel > gpus or (c.exact_gpus and gpus % model_parallel):
                    continue
                if any(v is not None and v != got for v, got in ((c.tp, tp), (c.pp, pp), (c.cp, cp))):
                    continue
                dp = _dp_choice(workload.global_batch, gpus // model_parallel, c.exact_gpus)
                if dp is not None:
                    yield tp, pp, cp, dp


def _shard_choices(dp: int, c: Constraints) -> list[int]:
    """dp_shard values; dp_replicate is dp // dp_shard (HSDP when both exceed 1)."""
    return [shard for shard in divisors(dp)
            if (c.dp_shard is None or shard == c.dp_shard) and (c.dp_replicate is None or dp // shard == c.dp_replicate)]


def _ep_choices(args: ModelArgs, shard: int, cp: int, c: Constraints) -> list[int]:
    """EP degrees: divisors of both the expert count and the dp_shard x cp ranks EP is carved from."""
    choices = divisors(math.gcd(args.n_experts, shard * cp)) if args.is_moe else [1]
    return [ep for ep in choices if c.ep is None or ep == c.ep]


def _schedule_choices(args: ModelArgs, pp: int, c: Constraints) -> list[tuple[str, int]]:
    """(pp_schedule, pp_stages_per_rank) pairs, by PyTorch's schedule names."""
    if pp == 1:
        return [("1F1B", 1)]
    per_stage = args.n_layers // pp if c.even_stages else math.ceil(args.n_layers / pp)
    chunkings = [v for v in range(2, min(per_stage, 16) + 1)
                 if (not c.even_stages or args.n_layers % (pp * v) == 0) and (c.even_stages or pp * v <= args.n_layers)]
    options = [("1F1B", 1), ("GPipe", 1)] + [(schedule, v) for v in chunkings for schedule in MULTI_STAGE_SCHEDULES]
    if c.pp_schedule is None:
        # GPipe never beats 1F1B (same bubble, more memory), nor LoopedBFS interleaved 1F1B.
        options = [(s, v) for s, v in options if s not in ("GPipe", "LoopedBFS")]
    else:
        options = [(s, v) for s, v in options if s == c.pp_schedule]
    if c.pp_stages_per_rank is not None:
        options = [(s, v) for s, v in options if v == c.pp_stages_per_rank]
    return options


def search(workload: Workload, gpus: int, gpu: Accelerator, efficiency: Efficiency = Efficiency(),
           constraints: Constraints = Constraints(), top: int = 5, distinct: bool = True) -> list[Estimate]:
    """The `top` fastest layouts that fit, best first (ties: fewer GPUs, then fewer model-parallel
    ranks). With `distinct`, only the best of each (tp, pp, ep) is kept, so the list shows
    different shapes rather than one shape's near-identical variants."""
    c = constraints
    args = workload.model
    best: list[Estimate] = []
    for tp, pp, cp, dp in degree_candidates(workload, gpus, gpu, c):
        per_rank = workload.global_batch // dp
        micro_batches = [m for m in divisors(per_rank) if m <= c.max_micro_batch]
        if c.micro_batch_size is not None:
            micro_batches = [c.micro_batch_size] if per_rank % c.micro_batch_size == 0 else []
        recomputes = ([c.activation_checkpointing] if c.activation_checkpointing is not None
                      else list(ACTIVATION_CHECKPOINTING))
        for shard in _shard_choices(dp, c):
            for ep in _ep_choices(args, shard, cp, c):
                for mbs in micro_batches:
                    for schedule, virtual in _schedule_choices(args, pp, c):
                        if schedule in MULTI_STAGE_SCHEDULES and (per_rank // mbs) % pp:
                            continue  # PyTorch's looped schedules take a multiple of pp micro-batches
                        for recompute in recomputes:  # fastest first: stop at the first that fits
                            layout = Layout(dp_replicate=dp // shard, dp_shard=shard, tp=tp, pp=pp, cp=cp,
                                            micro_batch_size=mbs, pp_schedule=schedule, pp_stages_per_rank=virtual,
                                            activation_checkpointing=recompute, ep=ep)
                            costed = estimate(workload, layout, gpu, efficiency, even_stages=c.even_stages)
                            if costed.fits:
                                best.append(costed)
                                break
        best = _rank(best, distinct)[: max(top, 1) * 4]  # keep the list short while searching
    return _rank(best, distinct)[:top]


def _rank(estimates: list[Estimate], distinct: bool) -> list[Estimate]:
    def key(e: Estimate):
        layout = e.layout
        # Step times within 0.1% are a tie (the model is not that precise): prefer the simpler layout.
        return (float(f"{e.step_time_s:.3g}"), e.gpus, layout.tp * layout.pp * layout.cp, layout.dp_replicate,
                -layout.micro_batch_size, layout.pp_stages_per_rank, layout.ep, e.step_time_s)
    ranked = sorted(estimates, key=key)
    if not distinct:
        return ranked
    seen, kept = set(), []
    for e in ranked:
        shape = (e.layout.tp, e.layout.pp, e.layout.ep)
        if shape not in seen:
            seen.add(shape)
            kept.append(e)
    return kept


def explain_no_layout(workload: Workload, gpus: int, gpu: Accelerator, constraints: Constraints,
                      fix: str = "change --gpus or --batch") -> str:
    """Why nothing fit, in one line: the smallest memory any valid layout needed, or the divisibility."""
    c, args = constraints, workload.model
    candidates = list(degree_candidates(workload, gpus, gpu, c))
    if not candidates:
        return (f"no layout of {gpus} devices divides the global batch of {workload.global_batch} sequences "
                f"and the model's heads (tp), layers (pp) and sequence (cp) within the constraints; {fix}")
    smallest = math.inf
    for tp, pp, cp, dp in candidates:
        ep = max(_ep_choices(args, dp, cp, Constraints()))  # the most experts split: the leanest
        layout = Layout(dp_shard=dp, tp=tp, pp=pp, cp=cp, micro_batch_size=1, activation_checkpointing="full", ep=ep)
        smallest = min(smallest, estimate(workload, layout, gpu, even_stages=c.even_stages).memory_total_gb)
    return (f"no layout fits in {gpu.memory_gb:g} GB per GPU: the leanest needs {smallest:.1f} GB; "
            f"use more GPUs, a GPU with more memory, or a shorter sequence")


def best_layout(workload: Workload, gpus: int, gpu: Accelerator, efficiency: Efficiency = Efficiency(),
                constraints: Constraints = Constraints(), fix: str = "change --gpus or --batch") -> Estimate:
    found = search(workload, gpus, gpu, efficiency, constraints, top=1)
    if not found:
        raise NoLayoutError(explain_no_layout(workload, gpus, gpu, constraints, fix))
    return found[0]


def auto_layout(model_args: ModelArgs, world_size: int, seq_len: int, global_batch: int, gpu: str,
                micro_batch_size: int | None = None, activation_checkpointing: str | None = None) -> Layout:
    """The planner's best layout for `gigatrain train --parallel.auto=true`, in the config's names:
    the five degrees (their product is world_size), the micro-batch size, the pipeline schedule
    and its stages per rank, the activation checkpointing the step time was estimated with, and
    `ep` (1 for dense; for MoE a divisor of n_experts and of dp_shard x cp).
    A micro-batch size or checkpointing mode given here is fixed rather than chosen. Raises
    ConfigError (one line) when no layout of world_size processes can train this model and batch.
    """
    from gigatrain.config import ConfigError

    if world_size == 1:
        return Layout(micro_batch_size=micro_batch_size or global_batch,
                      activation_checkpointing=activation_checkpointing or "none")
    try:
        accelerator = get_accelerator(gpu)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    workload = Workload(model_args, seq_len, global_batch, act_bytes=4 if gpu == "cpu" else 2)
    constraints = Constraints(exact_gpus=True, micro_batch_size=micro_batch_size,
                              activation_checkpointing=activation_checkpointing)
    try:
        return best_layout(workload, world_size, accelerator, Efficiency(), constraints,
                           fix="change the number of processes or train.batch_size").layout
    except NoLayoutError as err:
        raise ConfigError(f"parallel.auto: {err}") from None

"""One plan: the ranked layouts of a fleet with their days, megawatts, cost and reliability.

`make_plan` returns plain data (what `gigatrain plan --json` prints); report.py renders it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from gigatrain.models.flops import param_counts
from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import Accelerator
from gigatrain.plan.layout import Constraints, NoLayoutError, explain_no_layout, search
from gigatrain.plan.costs import Efficiency, Estimate, Workload, estimate as cost_layout
from gigatrain.plan.power import CostInputs, power_and_cost
from gigatrain.plan.reliability import (MODES, Cluster, Reliability, ReliabilityInputs, recovery_modes,
                                        replica_mode, simulate_run)
from gigatrain.plan.units import divisors

DEFAULT_BATCH_TOKENS = 2048 * 8192  # 16Mi tokens: Llama 3 405B's batch after its ramp-up (arXiv:2407.21783)
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal tokens per parameter


@dataclass
class PlanSpec:
    model_name: str
    model: ModelArgs
    gpu: Accelerator
    gpus: int
    seq_len: int
    global_batch: int  # sequences per optimizer step
    tokens: float  # training budget
    precision: str = "bf16"
    constraints: Constraints = field(default_factory=Constraints)
    efficiency: Efficiency = field(default_factory=Efficiency)
    cost: CostInputs = field(default_factory=CostInputs)
    reliability: ReliabilityInputs = field(default_factory=ReliabilityInputs)
    top: int = 5
    simulate: int = 0  # Monte Carlo samples; 0: closed form only
    seed: int = 0

    @property
    def workload(self) -> Workload:
        return Workload(self.model, self.seq_len, self.global_batch, precision=self.precision,
                        act_bytes=4 if self.gpu.name == "cpu" else 2)


def cluster_of(spec: PlanSpec, costed: Estimate) -> Cluster:
    return Cluster(params=param_counts(spec.model).total, gpus=costed.gpus, gpus_per_node=spec.gpu.gpus_per_node,
                   step_s=costed.step_time_s, dp_replicate=costed.layout.dp_replicate,
                   scaleout_gbs=spec.gpu.scaleout_bw_gbs)


def replica_choice(spec: PlanSpec, costed: Estimate) -> tuple[Estimate, Reliability] | None:
    """Replica mode for a layout: its data-parallel ranks split into R replica groups of
    dp / R shards each, R the one with the fewest expected days among the splits that fit in
    memory (more groups: a failure takes a smaller share of the job away; fewer shards: more
    memory per GPU, and another step time). None when dp < 2."""
    layout = costed.layout
    best = None
    for groups in divisors(layout.dp):
        shard = layout.dp // groups
        if groups < 2 or (shard * layout.cp) % layout.ep or (spec.constraints.dp_replicate not in (None, groups)):
            continue
        split = replace(layout, dp_replicate=groups, dp_shard=shard)
        option = costed if split == layout else cost_layout(spec.workload, split, spec.gpu, spec.efficiency,
                                                              even_stages=spec.constraints.even_stages)
        if not option.fits:
            continue
        rel = replica_mode(cluster_of(spec, option), spec.tokens / option.tokens_per_s / 3600, spec.reliability)
        if best is None or rel.expected_hours < best[1].expected_hours:
            best = (option, rel)
    return best


def recovery_of(spec: PlanSpec, costed: Estimate) -> dict[str, dict]:
    """Each recovery mode's goodput, expected days and restart, for one layout (replica mode
    with the replica groups it chose, and that split's layout)."""
    ideal_hours = spec.tokens / costed.tokens_per_s / 3600
    modes = {name: rel.to_dict() for name, rel in recovery_modes(cluster_of(spec, costed), ideal_hours,
                                                                 spec.reliability).items() if name != "replica"}
    choice = replica_choice(spec, costed)
    if choice is not None:
        split, rel = choice
        modes["replica"] = {**rel.to_dict(), "layout": split.layout.describe(), "step_time_s": split.step_time_s}
    return {name: modes[name] for name in MODES if name in modes}


def layout_record(spec: PlanSpec, estimate: Estimate) -> dict:
    """Everything about one layout that scripts rely on, in plain numbers (see docs/planner.md)."""
    layout = estimate.layout
    ideal_hours = spec.tokens / estimate.tokens_per_s / 3600
    recovery = recovery_of(spec, estimate)
    mode = max(recovery, key=lambda name: recovery[name]["goodput"])
    expected_hours = recovery[mode]["expected_hours"]
    # The fleet draws power and is paid for while it trains, stalls and restarts.
    money = power_and_cost(spec.gpu, spec.gpus, expected_hours, spec.cost)
    return {
        **layout.degrees(),
        "ep": layout.ep,
        "micro_batch_size": layout.micro_batch_size,
        "microbatches": estimate.microbatches,
        "pp_schedule": layout.pp_schedule if layout.pp > 1 else None,
        "pp_stages_per_rank": layout.pp_stages_per_rank,
        "activation_checkpointing": layout.activation_checkpointing,
        "layout": layout.describe(),
        "gpus_used": estimate.gpus,
        "step_time_s": estimate.step_time_s,
        "tokens_per_s": estimate.tokens_per_s,
        "mfu": estimate.mfu,
        "hfu": estimate.hfu,
        "days": ideal_hours / 24,
        "days_expected": expected_hours / 24,
        "goodput": recovery[mode]["goodput"],
        "recovery_mode": mode,
        "recovery": recovery,
        "power_mw": money.site_power_mw,
        "energy_mwh": money.energy_mwh,
        "cost_lease_usd": money.cost_lease_usd,
        "cost_build_usd": money.cost_build_usd,
        "memory_gb": estimate.memory_gb,
        "memory_total_gb": estimate.memory_total_gb,
        "time_s": estimate.time_s,
    }


def make_plan(spec: PlanSpec) -> dict:
    """Search the layouts and cost the best ones; raises NoLayoutError when none fits."""
    workload = spec.workload
    estimates = search(workload, spec.gpus, spec.gpu, spec.efficiency, spec.constraints, spec.top)
    if not estimates:
        raise NoLayoutError(explain_no_layout(workload, spec.gpus, spec.gpu, spec.constraints,
                                              "change --gpus, --batch or the fixed choices"
                                              + (" (or drop --exact)" if spec.constraints.exact_gpus else "")))
    layouts = [layout_record(spec, e) for e in estimates]
    best = layouts[0]
    counts = param_counts(spec.model)
    params = counts.total
    money = power_and_cost(spec.gpu, spec.gpus, best["days_expected"] * 24, spec.cost)
    result = {
        "model": spec.model_name,
        "params": params,
        "params_total": params,
        "params_active": counts.active,  # what one token goes through (MFU counts these); = total for dense
        "gpu": spec.gpu.name,
        "gpu_description": spec.gpu.description,
        "gpus": spec.gpus,
        "gpu_memory_gb": spec.gpu.memory_gb,
        "precision": spec.precision,
        "tokens": spec.tokens,
        "seq_len": spec.seq_len,
        "global_batch": spec.global_batch,
        "tokens_per_step": workload.tokens_per_step,
        "flops_per_token": workload.flops_per_token,
        "layouts": layouts,
        "best": layouts[0],
        "power": money.to_dict(),
        "recovery": best["recovery"],
        "recovery_mode": best["recovery_mode"],
        "reliability": best["recovery"][best["recovery_mode"]],
        "efficiency": spec.efficiency.resolve(spec.gpu).to_dict(),
        "inputs": {"cost": asdict(spec.cost), "reliability": asdict(spec.reliability)},
    }
    if spec.simulate:
        result["simulation"] = {}
        for mode, rel in best["recovery"].items():
            costed = estimates[0]
            if mode == "replica" and rel["layout"] != best["layout"]:  # the split replica mode chose
                costed = replica_choice(spec, estimates[0])[0]
            result["simulation"][mode] = simulate_run(cluster_of(spec, costed), rel["ideal_hours"], spec.reliability,
                                                      mode, samples=spec.simulate, seed=spec.seed)
    return result

"""One plan: the ranked layouts of a fleet with their days, megawatts, cost and reliability.

`make_plan` returns plain data (what `gigatrain plan --json` prints); report.py renders it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gigatrain.models.flops import param_counts
from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import Accelerator
from gigatrain.plan.layout import Constraints, NoLayoutError, explain_no_layout, search
from gigatrain.plan.costs import Efficiency, Estimate, Workload
from gigatrain.plan.power import CostInputs, power_and_cost
from gigatrain.plan.reliability import ReliabilityInputs, reliability, simulate_run

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


def layout_record(spec: PlanSpec, estimate: Estimate) -> dict:
    """Everything about one layout that scripts rely on, in plain numbers (see docs/planner.md)."""
    layout = estimate.layout
    params = param_counts(spec.model).total
    ideal_hours = spec.tokens / estimate.tokens_per_s / 3600
    rel = reliability(params, estimate.gpus, spec.gpu.gpus_per_node, ideal_hours, spec.reliability)
    # The fleet draws power and is paid for while it trains, stalls and restarts.
    money = power_and_cost(spec.gpu, spec.gpus, rel.expected_hours, spec.cost)
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
        "days_expected": rel.expected_hours / 24,
        "goodput": rel.goodput,
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
    best = estimates[0]
    counts = param_counts(spec.model)
    params = counts.total
    ideal_hours = spec.tokens / best.tokens_per_s / 3600
    rel = reliability(params, best.gpus, spec.gpu.gpus_per_node, ideal_hours, spec.reliability)
    money = power_and_cost(spec.gpu, spec.gpus, rel.expected_hours, spec.cost)
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
        "reliability": rel.to_dict(),
        "efficiency": spec.efficiency.resolve(spec.gpu).to_dict(),
        "inputs": {"cost": asdict(spec.cost), "reliability": asdict(spec.reliability)},
    }
    if spec.simulate:
        result["simulation"] = simulate_run(params, best.gpus, spec.gpu.gpus_per_node, ideal_hours, spec.reliability,
                                            samples=spec.simulate, seed=spec.seed)
    return result

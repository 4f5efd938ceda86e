"""Failures at scale: interruptions, checkpoint interval, goodput, and a Monte Carlo of the run.

The model (Daly 2006, "A higher order estimate of the optimum checkpoint interval for restart
dumps"): interruptions arrive as a Poisson process of rate 1/M; the job checkpoints after every
tau hours of work, which takes delta; an interruption loses the work since the last checkpoint
and costs a restart of R (which can itself be interrupted). A segment that needs t hours of
uninterrupted time then takes M e^(R/M) (e^(t/M) - 1) hours on average, which is exact for this
model, and is what the Monte Carlo below must agree with. Planned interruptions (maintenance)
checkpoint first, so they cost a restart but lose no work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

# Defaults from the Llama 3 405B run (arXiv:2407.21783, sec. 3.3.4 and table 5): 419 unexpected
# interruptions in a 54-day snapshot on 16,384 H100s in 2,048 servers, of which 53 were host
# problems (host maintenance, NIC, SSD, power supply, chassis, IO board, CPU, memory) and 366
# came from GPUs, their memory, the network and software, which grow with the number of GPUs.
LLAMA3_GPUS, LLAMA3_NODES, LLAMA3_HOURS = 16384, 2048, 54 * 24
LLAMA3_GPU_MTBF_HOURS = LLAMA3_GPUS * LLAMA3_HOURS / 366  # ~58,000 GPU-hours per interruption
LLAMA3_NODE_MTBF_HOURS = LLAMA3_NODES * LLAMA3_HOURS / 53  # ~50,000 node-hours per interruption
LLAMA3_PLANNED_PER_DAY = 47 / 54


@dataclass(frozen=True)
class ReliabilityInputs:
    gpu_mtbf_hours: float = LLAMA3_GPU_MTBF_HOURS  # per GPU (GPU, HBM, network, software causes)
    node_mtbf_hours: float = LLAMA3_NODE_MTBF_HOURS  # per server (host causes)
    planned_per_day: float = LLAMA3_PLANNED_PER_DAY  # maintenance interruptions of the job
    restart_minutes: float = 10.0  # detect, reschedule onto spares, start, NCCL init (checkpoint load added)
    storage_gbs: float = 2000.0  # checkpoint write and read bandwidth, GB/s, whole job
    checkpoint_bytes_per_param: float = 12.0  # fp32 weights and AdamW's two fp32 states
    checkpoint_interval_minutes: float | None = None  # None: Daly's optimum


SOURCES = {
    "gpu_mtbf_hours": "Llama 3 (arXiv:2407.21783) table 5: 366 GPU/memory/network/software interruptions, 16,384 GPUs, 54 days",
    "node_mtbf_hours": "Llama 3 table 5: 53 host interruptions (maintenance, NIC, SSD, PSU, chassis, IO board, CPU, DRAM) on 2,048 servers, 54 days",
    "planned_per_day": "Llama 3 sec. 3.3.4: 47 planned interruptions in 54 days",
    "restart_minutes": "assumption: automated detection, rescheduling and restart in ~10 minutes (Llama 3 reports only 3 manual interventions)",
    "storage_gbs": "Llama 3 sec. 3.3.1: Tectonic sustains 2 TB/s (7 TB/s peak)",
    "checkpoint_bytes_per_param": "FSDP2 distributed checkpoint: fp32 parameters + AdamW exp_avg and exp_avg_sq",
    "checkpoint_interval_minutes": "Daly 2006 higher-order optimum (Young 1974: sqrt(2 delta M))",
}


@dataclass
class Reliability:
    mtbi_hours: float  # mean time between unplanned interruptions of the whole job
    checkpoint_gb: float
    checkpoint_write_s: float
    restart_s: float
    checkpoint_interval_s: float
    goodput: float  # useful training time / wall-clock time
    ideal_hours: float
    expected_hours: float
    expected_interruptions: float  # unplanned plus planned, over the expected run

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def interruption_rate_per_hour(gpus: int, gpus_per_node: int, inputs: ReliabilityInputs) -> float:
    nodes = math.ceil(gpus / gpus_per_node)
    return gpus / inputs.gpu_mtbf_hours + nodes / inputs.node_mtbf_hours


def daly_interval(delta: float, mtbi: float) -> float:
    """Daly's higher-order optimum checkpoint interval (same unit as the inputs)."""
    if delta >= 2 * mtbi:
        return mtbi
    x = delta / (2 * mtbi)
    return math.sqrt(2 * delta * mtbi) * (1 + math.sqrt(x) / 3 + x / 9) - delta


def segment_time(work: float, delta: float, restart: float, mtbi: float) -> float:
    """Expected wall time to do `work` then a checkpoint of `delta`, under interruptions."""
    return mtbi * math.exp(restart / mtbi) * math.expm1((work + delta) / mtbi)


def expected_run_hours(work: float, interval: float, delta: float, restart: float, mtbi: float,
                       planned_per_hour: float = 0.0) -> float:
    """Exact expectation of the wall time for `work` hours of training (checkpoint every `interval`)."""
    full_segments = math.floor(work / interval + 1e-9)
    rest = work - full_segments * interval
    hours = full_segments * segment_time(interval, delta, restart, mtbi)
    if rest > 1e-12:
        hours += segment_time(rest, delta, restart, mtbi)
    if planned_per_hour * restart >= 1:
        return math.inf
    return hours / (1 - planned_per_hour * restart)  # each planned stop costs a restart, no lost work


def reliability(params: int, gpus: int, gpus_per_node: int, ideal_hours: float,
                inputs: ReliabilityInputs = ReliabilityInputs()) -> Reliability:
    mtbi = 1 / interruption_rate_per_hour(gpus, gpus_per_node, inputs)
    checkpoint_bytes = params * inputs.checkpoint_bytes_per_param
    delta = checkpoint_bytes / (inputs.storage_gbs * 1e9) / 3600
    restart = inputs.restart_minutes / 60 + delta  # reading the checkpoint back takes as long as writing
    interval = (inputs.checkpoint_interval_minutes / 60 if inputs.checkpoint_interval_minutes
                else daly_interval(delta, mtbi))
    planned = inputs.planned_per_day / 24
    expected = expected_run_hours(ideal_hours, interval, delta, restart, mtbi, planned)
    return Reliability(
        mtbi_hours=mtbi, checkpoint_gb=checkpoint_bytes / 1e9, checkpoint_write_s=delta * 3600,
        restart_s=restart * 3600, checkpoint_interval_s=interval * 3600, goodput=ideal_hours / expected,
        ideal_hours=ideal_hours, expected_hours=expected, expected_interruptions=expected * (1 / mtbi + planned),
    )


def simulate(work: float, interval: float, delta: float, restart: float, mtbi: float, planned_per_hour: float = 0.0,
             samples: int = 2000, seed: int = 0) -> dict:
    """Monte Carlo of whole runs: wall-clock hours and interruptions per run.

    All runs advance together, one interruption at a time: from the last checkpoint a run
    restarts (unless it is the first start), then works in segments of `interval` hours, each
    followed by a checkpoint of `delta`; it finishes if the next interruption comes late
    enough, else keeps the segments it completed and waits for a restart.
    """
    rng = np.random.default_rng(seed)
    remaining = np.full(samples, float(work))
    wall = np.zeros(samples)
    interruptions = np.zeros(samples)
    needs_restart = np.zeros(samples, dtype=bool)
    active = np.ones(samples, dtype=bool)
    cycle = interval + delta
    while active.any():
        idx = np.flatnonzero(active)
        gap = rng.exponential(mtbi, idx.size)
        restart_cost = np.where(needs_restart[idx], restart, 0.0)
        available = gap - restart_cost
        segments_left = np.ceil(remaining[idx] / interval - 1e-9)
        to_finish = remaining[idx] + segments_left * delta
        finishes = available >= to_finish
        done = idx[finishes]
        wall[done] += restart_cost[finishes] + to_finish[finishes]
        active[done] = False
        hit = idx[~finishes]
        completed = np.floor(np.maximum(available[~finishes], 0.0) / cycle)
        remaining[hit] -= completed * interval
        wall[hit] += gap[~finishes]
        interruptions[hit] += 1
        needs_restart[hit] = True
    if planned_per_hour > 0:
        planned = rng.poisson(planned_per_hour * wall / max(1e-12, 1 - planned_per_hour * restart))
        wall += planned * restart
        interruptions += planned
    return {"hours": wall, "interruptions": interruptions}


def simulate_run(params: int, gpus: int, gpus_per_node: int, ideal_hours: float,
                 inputs: ReliabilityInputs = ReliabilityInputs(), samples: int = 2000, seed: int = 0) -> dict:
    """The Monte Carlo for a planned run, summarised: mean and p10/p50/p90 of the completion time."""
    closed = reliability(params, gpus, gpus_per_node, ideal_hours, inputs)
    runs = simulate(ideal_hours, closed.checkpoint_interval_s / 3600, closed.checkpoint_write_s / 3600,
                    closed.restart_s / 3600, closed.mtbi_hours, inputs.planned_per_day / 24, samples, seed)
    days = runs["hours"] / 24
    p10, p50, p90 = np.percentile(days, [10, 50, 90])
    return {"samples": samples, "mean_days": float(days.mean()), "p10_days": float(p10), "p50_days": float(p50),
            "p90_days": float(p90), "closed_form_days": closed.expected_hours / 24,
            "mean_interruptions": float(runs["interruptions"].mean())}

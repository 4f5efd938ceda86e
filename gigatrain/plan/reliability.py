"""Failures at scale: interruptions, restart phases, three recovery modes, goodput, Monte Carlo.

The model (Daly 2006, "A higher order estimate of the optimum checkpoint interval for restart
dumps"): interruptions arrive as a Poisson process of rate 1/M; the job checkpoints after every
tau hours of work, which takes delta; an interruption loses the work since the last checkpoint
and costs a restart of R (which can itself be interrupted). A segment that needs t hours of
uninterrupted time then takes M e^(R/M) (e^(t/M) - 1) hours on average, which is exact for this
model, and is what the Monte Carlo below must agree with. Planned interruptions (maintenance)
checkpoint first, so they cost a restart but lose no work.

A restart is the sum of its phases (`restart_phases`, the same names as a restart's `phases` in
events.jsonl), each from an input with its source in SOURCES and its own scaling with the
cluster. The three recovery modes of `fault.recovery` (docs/fault-tolerance.md) differ in what
a failure costs:

- storage: every process restarts and loads the last storage checkpoint (Daly, as above);
- memory: every process restarts and loads an in-memory copy taken every few steps (own host,
  or the peer host's replica for a replaced host): the lost work is a few steps, the load is a
  copy from host memory or a peer. A failure that takes a host and its peer's copy too (or the
  whole job) falls back to the storage checkpoint, whose interval is Daly's for those failures;
- replica: the failed data-parallel replica group (one of `dp_replicate`) restarts and rejoins
  from a live peer while the others train on: a failure costs 1/R of the throughput for the
  rejoin time, plus the step in flight; each step pays a quorum round. A failure that leaves no
  replica group alive (or takes the whole job) falls back to storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

# Defaults from the Llama 3 405B run (arXiv:2407.21783, sec. 3.3.4 and table 5): 419 unexpected
# interruptions in a 54-day snapshot on 16,384 H100s in 2,048 servers, of which 53 were host
# problems (host maintenance, NIC, SSD, power supply, chassis, IO board, CPU, memory) and 366
# came from GPUs, their memory, the network and software, which grow with the number of GPUs.
LLAMA3_GPUS, LLAMA3_NODES, LLAMA3_HOURS = 16384, 2048, 54 * 24
LLAMA3_GPU_MTBF_HOURS = LLAMA3_GPUS * LLAMA3_HOURS / 366  # ~58,000 GPU-hours per interruption
LLAMA3_NODE_MTBF_HOURS = LLAMA3_NODES * LLAMA3_HOURS / 53  # ~50,000 node-hours per interruption
LLAMA3_PLANNED_PER_DAY = 47 / 54
LLAMA3_DEPENDENCY_FRACTION = 2 / 419  # table 5: "Dependency" (a shared outside service), 2 of 419

MODES = ("storage", "memory", "replica")
PHASES = ("detect_s", "reschedule_s", "start_s", "rendezvous_s", "build_s", "load_s", "compile_s", "first_step_s")


@dataclass(frozen=True)
class ReliabilityInputs:
    gpu_mtbf_hours: float = LLAMA3_GPU_MTBF_HOURS  # per GPU (GPU, HBM, network, software causes)
    node_mtbf_hours: float = LLAMA3_NODE_MTBF_HOURS  # per server (host causes)
    planned_per_day: float = LLAMA3_PLANNED_PER_DAY  # maintenance interruptions of the job
    # Restart phases, seconds (events.jsonl names; `restart_phases` adds load_s and first_step_s).
    detect_s: float = 60.0  # failure -> the job knows (a dead process: seconds; a hang: the watchdog)
    reschedule_s: float = 120.0  # a spare node replaces the failed one and its container starts
    start_s: float = 30.0  # process start, imports, CUDA context
    rendezvous_s: float = 10.0  # store + process group + first collective, fixed part ...
    rendezvous_ms_per_gpu: float = 1.0  # ... plus this per GPU of the group that meets
    build_s: float = 30.0  # model built on meta, parallelized, optimizer built
    compile_s: float = 60.0  # first step's extra time (compile warm-up from the cache)
    storage_gbs: float = 2000.0  # checkpoint write and read bandwidth, GB/s, whole job
    checkpoint_bytes_per_param: float = 12.0  # fp32 weights and AdamW's two fp32 states
    checkpoint_interval_minutes: float | None = None  # None: Daly's optimum
    # memory: copies of each GPU's shard to host memory, loaded back at a restart.
    memory_copy_gbs: float = 25.0  # GPU -> host memory per GPU (PCIe Gen5 x16), the copy's stall
    memory_load_gbs: float = 25.0  # host memory -> GPU per GPU, a restart's load from its own host
    # replica: torchft's Lighthouse quorum.
    replica_detect_s: float = 5.0  # healthy replica groups see a dead one (Lighthouse heartbeat timeout)
    quorum_s: float = 0.01  # per step: the quorum round not hidden behind the backward pass
    whole_job_fraction: float = LLAMA3_DEPENDENCY_FRACTION  # failures that take every host/replica at once


SOURCES = {
    "gpu_mtbf_hours": "Llama 3 (arXiv:2407.21783) table 5: 366 GPU/memory/network/software interruptions, 16,384 GPUs, 54 days",
    "node_mtbf_hours": "Llama 3 table 5: 53 host interruptions (maintenance, NIC, SSD, PSU, chassis, IO board, CPU, DRAM) on 2,048 servers, 54 days",
    "planned_per_day": "Llama 3 sec. 3.3.4: 47 planned interruptions in 54 days",
    "detect_s": "assumption: a crash is seen by torchrun in seconds, a hang by the watchdog/heartbeat (fault.watchdog_s) set near a minute; fixed with N (every rank watches itself)",
    "reschedule_s": "assumption: a hot spare node takes the failed one's place and starts its container (image cached) in 2 min; fixed with N",
    "start_s": "assumption: Python + torch + gigatrain imports and CUDA contexts on a replaced host (container start, shared file system, 8 ranks per host), 30 s; fixed with N (every node in parallel). Measured on one H100 (2026-11-26, bench/startup.py --procs 1, gpt2-124m): imports 5.4 s cold, 0.06 s in a warm spare (fault.warm_spare)",
    "rendezvous_s": "assumption pending measurement at scale: TCPStore + process-group bootstrap, fixed part",
    "rendezvous_ms_per_gpu": "assumption pending measurement at scale: rendezvous and NCCL bootstrap gather every rank's address at one root: linear in the GPUs that meet (100 s at 100k)",
    "build_s": "assumption: meta-device build + FSDP/TP sharding + optimizer, per rank, fixed with N (each rank builds its shard); measured 2.7-3.9 s on one H100 for gpt2-124m, CUDA context included",
    "compile_s": "assumption: torch.compile warm-up from the inductor cache on a large model, fixed with N; measured on one H100 for gpt2-124m: 1.4 s with the cache the first start left on the host, 9.7 s cold",
    "storage_gbs": "Llama 3 sec. 3.3.1: Tectonic sustains 2 TB/s (7 TB/s peak); a checkpoint load = bytes / this",
    "checkpoint_bytes_per_param": "FSDP2 distributed checkpoint: fp32 parameters + AdamW exp_avg and exp_avg_sq",
    "checkpoint_interval_minutes": "Daly 2006 higher-order optimum (Young 1974: sqrt(2 delta M))",
    "memory_copy_gbs": "PCIe Gen5 x16 (64 GB/s per direction); measured on one H100 alone (2026-11-26, bench/memory_copy.py): 48 GB/s into the copy's pinned buffer (1.02 GB in 21 ms); 25 GB/s assumed with 8 GPUs sharing a host's memory bandwidth; stall = a GPU's shard / this. The copy's write into /dev/shm (2.5 GB/s per process measured) runs behind training and bounds how often copies can be taken (a shard of a few GB: seconds, far below the optimum interval), not their stall",
    "memory_load_gbs": "as memory_copy_gbs, host -> GPU; a replaced host loads its copy from its peer over the network instead (catalog scaleout_bw_gbs)",
    "replica_detect_s": "torchft 0.2.0: torchft_lighthouse --heartbeat_timeout_ms defaults to 5000 (Managers heartbeat every 100 ms); a process that dies breaks the step's collective at once",
    "quorum_s": "assumption: torchft overlaps the quorum with the backward pass (docs.pytorch.org/torchft); 10 ms per step left exposed (measured on CPU, 2 groups in one process: quorum 1-2 ms, gradient average 1-5 ms, commit < 1 ms)",
    "whole_job_fraction": "Llama 3 table 5: 2 of 419 interruptions were 'Dependency' (a shared service): they stop every replica and host alike",
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
    mode: str = "storage"
    phases: dict = field(default_factory=dict)  # the restart's phases, seconds (sum: restart_s)
    fallback_per_failure: float = 1.0  # share of failures that restart from storage
    memory_interval_s: float = 0.0  # memory: in-memory copy interval (whole steps)
    memory_stall_s: float = 0.0  # memory: stall of one in-memory copy
    replica_groups: int = 1  # replica: R
    quorum_s: float = 0.0  # replica: per-step quorum overhead

    @property
    def days_expected(self) -> float:
        return self.expected_hours / 24

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "days_expected": self.days_expected}


@dataclass(frozen=True)
class Cluster:
    """What the phases scale with: the job's size and layout."""

    params: int
    gpus: int
    gpus_per_node: int
    step_s: float = 1.0  # one optimizer step (the first step after a restart takes one, plus compile_s)
    dp_replicate: int = 1  # replica groups (HSDP's replicate axis)
    scaleout_gbs: float = 50.0  # per GPU, between nodes (the peer load)


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


def restart_phases(inputs: ReliabilityInputs, gpus_meeting: int, load_s: float, step_s: float) -> dict:
    """One restart, phase by phase (seconds): what scales with the cluster is the rendezvous
    (linear in the GPUs that meet) and the load (given: bytes over the bandwidth that carries
    them); the rest is each node's own work, done in parallel."""
    return {"detect_s": inputs.detect_s, "reschedule_s": inputs.reschedule_s, "start_s": inputs.start_s,
            "rendezvous_s": inputs.rendezvous_s + inputs.rendezvous_ms_per_gpu / 1000 * gpus_meeting,
            "build_s": inputs.build_s, "load_s": load_s, "compile_s": inputs.compile_s, "first_step_s": step_s}


def checkpoint_bytes(cluster: Cluster, inputs: ReliabilityInputs) -> float:
    """One copy of the training state (weights and optimizer): what a storage checkpoint holds."""
    return cluster.params * inputs.checkpoint_bytes_per_param


def gpu_state_bytes(cluster: Cluster, inputs: ReliabilityInputs) -> float:
    """One GPU's shard of the state: each replica group holds a whole copy over its GPUs."""
    return checkpoint_bytes(cluster, inputs) * max(1, cluster.dp_replicate) / cluster.gpus


def _storage_checkpoint(cluster: Cluster, inputs: ReliabilityInputs, mtbi_hours: float) -> tuple[float, float]:
    """(write/read time, interval) of the storage checkpoint, hours: Daly's optimum for the
    failures that need it, unless the interval is given."""
    delta = checkpoint_bytes(cluster, inputs) / (inputs.storage_gbs * 1e9) / 3600
    interval = (inputs.checkpoint_interval_minutes / 60 if inputs.checkpoint_interval_minutes
                else daly_interval(delta, mtbi_hours))
    return delta, interval


def _planned_divisor(planned_per_hour: float, restart_hours: float) -> float:
    """Planned stops checkpoint first, then cost one restart each: wall time / (1 - rate x restart)."""
    return 1 - planned_per_hour * restart_hours


def storage_mode(cluster: Cluster, ideal_hours: float, inputs: ReliabilityInputs = ReliabilityInputs()) -> Reliability:
    mtbi = 1 / interruption_rate_per_hour(cluster.gpus, cluster.gpus_per_node, inputs)
    delta, interval = _storage_checkpoint(cluster, inputs, mtbi)
    phases = restart_phases(inputs, cluster.gpus, delta * 3600, cluster.step_s)  # reading back takes as long as writing
    restart = sum(phases.values()) / 3600
    planned = inputs.planned_per_day / 24
    expected = expected_run_hours(ideal_hours, interval, delta, restart, mtbi, planned)
    return Reliability(
        mtbi_hours=mtbi, checkpoint_gb=checkpoint_bytes(cluster, inputs) / 1e9, checkpoint_write_s=delta * 3600,
        restart_s=restart * 3600, checkpoint_interval_s=interval * 3600, goodput=ideal_hours / expected,
        ideal_hours=ideal_hours, expected_hours=expected, expected_interruptions=expected * (1 / mtbi + planned),
        mode="storage", phases=phases)


def memory_fallback_share(cluster: Cluster, inputs: ReliabilityInputs, restart_hours: float) -> float:
    """Share of failures the in-memory copies cannot serve: the whole job at once, or the
    failed host's peer (which holds its replica) failing too before the copies are whole again
    (within a restart)."""
    host_rate = cluster.gpus_per_node / inputs.gpu_mtbf_hours + 1 / inputs.node_mtbf_hours
    peer_lost = -math.expm1(-host_rate * restart_hours)
    return inputs.whole_job_fraction + (1 - inputs.whole_job_fraction) * peer_lost


def memory_mode(cluster: Cluster, ideal_hours: float, inputs: ReliabilityInputs = ReliabilityInputs()) -> Reliability:
    mtbi = 1 / interruption_rate_per_hour(cluster.gpus, cluster.gpus_per_node, inputs)
    storage = storage_mode(cluster, ideal_hours, inputs)
    shard = gpu_state_bytes(cluster, inputs)
    # A replaced host loads its copy from its peer over the network; the others from their own
    # host memory, faster: the job waits for the slowest.
    load_s = max(shard / (inputs.memory_load_gbs * 1e9), shard / (cluster.scaleout_gbs * 1e9))
    phases = restart_phases(inputs, cluster.gpus, load_s, cluster.step_s)
    restart = sum(phases.values()) / 3600
    stall = shard / (inputs.memory_copy_gbs * 1e9) / 3600
    step = cluster.step_s / 3600
    memory_every = max(1, round(daly_interval(stall, mtbi) / step))  # whole steps
    tau_m = memory_every * step
    fallback = memory_fallback_share(cluster, inputs, restart)
    fallback_rate = fallback / mtbi
    delta_s, tau_s = _storage_checkpoint(cluster, inputs, 1 / fallback_rate if fallback_rate > 0 else 1e12)
    expected = memory_expected_hours(ideal_hours, tau_m, stall, restart, tau_s, delta_s, storage.restart_s / 3600,
                                     mtbi, fallback, inputs.planned_per_day / 24)
    return Reliability(
        mtbi_hours=mtbi, checkpoint_gb=storage.checkpoint_gb, checkpoint_write_s=delta_s * 3600, restart_s=restart * 3600,
        checkpoint_interval_s=tau_s * 3600, goodput=ideal_hours / expected, ideal_hours=ideal_hours,
        expected_hours=expected, expected_interruptions=expected * (1 / mtbi + inputs.planned_per_day / 24),
        mode="memory", phases=phases, fallback_per_failure=fallback, memory_interval_s=tau_m * 3600,
        memory_stall_s=stall * 3600)


def memory_expected_hours(work: float, tau_m: float, delta_m: float, restart_m: float, tau_s: float, delta_s: float,
                          restart_s: float, mtbi: float, fallback: float, planned_per_hour: float = 0.0) -> float:
    """Two-level checkpoints (hours): the in-memory level is Daly's exact segment model for the
    failures it serves (rate (1 - fallback)/M), with the storage writes' stalls as extra work;
    each failure it cannot serve (rate fallback/M, rare) costs a storage restart and, on
    average, half a storage cycle of wall time (first order in that rate)."""
    work_with_writes = work * (1 + delta_s / tau_s)
    memory_mtbi = mtbi / (1 - fallback) if fallback < 1 else 1e12
    served = expected_run_hours(work_with_writes, tau_m, delta_m, restart_m, memory_mtbi)
    cycle_wall = tau_s * served / work
    lost_share = fallback / mtbi * (restart_s + cycle_wall / 2) + planned_per_hour * restart_s
    return math.inf if lost_share >= 1 else served / (1 - lost_share)


def replica_mode(cluster: Cluster, ideal_hours: float, inputs: ReliabilityInputs = ReliabilityInputs()) -> Reliability:
    groups = max(1, cluster.dp_replicate)
    mtbi = 1 / interruption_rate_per_hour(cluster.gpus, cluster.gpus_per_node, inputs)
    storage = storage_mode(cluster, ideal_hours, inputs)
    # The rejoining group meets only its own GPUs, and takes its shard of the live state from a
    # healthy group's matching rank over the network.
    load_s = gpu_state_bytes(cluster, inputs) / (cluster.scaleout_gbs * 1e9)
    phases = restart_phases(inputs, math.ceil(cluster.gpus / groups), load_s, cluster.step_s)
    rejoin = sum(phases.values()) / 3600
    fallback = replica_fallback_share(groups, rejoin, mtbi, inputs.whole_job_fraction)
    fallback_rate = fallback / mtbi
    delta_s, tau_s = _storage_checkpoint(cluster, inputs, 1 / fallback_rate if fallback_rate > 0 else 1e12)
    expected = replica_expected_hours(ideal_hours, groups, rejoin, cluster.step_s / 3600, inputs.replica_detect_s / 3600,
                                      inputs.quorum_s / 3600, tau_s, delta_s, storage.restart_s / 3600, mtbi, fallback,
                                      inputs.planned_per_day / 24)
    return Reliability(
        mtbi_hours=mtbi, checkpoint_gb=storage.checkpoint_gb, checkpoint_write_s=delta_s * 3600, restart_s=rejoin * 3600,
        checkpoint_interval_s=tau_s * 3600, goodput=ideal_hours / expected, ideal_hours=ideal_hours,
        expected_hours=expected, expected_interruptions=expected * (1 / mtbi + inputs.planned_per_day / 24),
        mode="replica", phases=phases, fallback_per_failure=fallback, replica_groups=groups, quorum_s=inputs.quorum_s)


def replica_fallback_share(groups: int, rejoin: float, mtbi: float, whole_job_fraction: float) -> float:
    """Share of failures that leave no replica group training: the whole job at once, or the
    last healthy group failing while every other one is still rejoining (each is away with
    probability about (rate / R) x rejoin, independently)."""
    if groups < 2:
        return 1.0
    away = min(1.0, rejoin / mtbi / groups)
    return whole_job_fraction + (1 - whole_job_fraction) * away ** (groups - 1)


def replica_expected_hours(work: float, groups: int, rejoin: float, step: float, detect: float, quorum: float,
                           tau_s: float, delta_s: float, restart_s: float, mtbi: float, fallback: float,
                           planned_per_hour: float = 0.0) -> float:
    """Replica groups (hours): training runs at the rate `efficiency` (the quorum per step, the
    storage writes' stalls); a failure one group survives costs that group's share 1/R of the
    throughput for the rejoin time, and the other groups the step in flight and the time to see
    the failure; a failure none survives costs a storage restart and half a storage cycle. First
    order in the overlap of absences (exact when they never overlap)."""
    if groups < 2:
        return expected_run_hours(work, tau_s, delta_s, restart_s, mtbi, planned_per_hour)
    efficiency = step / (step + quorum) * tau_s / (tau_s + delta_s)
    # A group is away with probability `away`; a failure of a group already away only extends
    # its absence (by half a rejoin on average), and the step in flight is lost by those training.
    away = min(1.0, rejoin / mtbi / groups)
    survived = (1 - fallback) / mtbi * (rejoin / groups * (1 - away / 2)
                                        + (step + detect) * (groups - 1) / groups * (1 - away))
    lost = survived + fallback / mtbi * (restart_s + tau_s / (2 * efficiency)) + planned_per_hour * restart_s
    return math.inf if lost >= 1 else work / efficiency / (1 - lost)


def recovery_modes(cluster: Cluster, ideal_hours: float,
                   inputs: ReliabilityInputs = ReliabilityInputs()) -> dict[str, Reliability]:
    """Each recovery mode's closed form for one layout. Replica mode needs dp_replicate >= 2."""
    modes = {"storage": storage_mode(cluster, ideal_hours, inputs), "memory": memory_mode(cluster, ideal_hours, inputs)}
    if cluster.dp_replicate >= 2:
        modes["replica"] = replica_mode(cluster, ideal_hours, inputs)
    return modes


def with_planned_stops(rng, wall, interruptions, planned_per_hour: float, restart: float) -> dict:
    """The simulated runs' result, with planned interruptions (maintenance) added: they come at
    `planned_per_hour` of the whole wall time, restarts included, and each costs a restart but
    loses no work."""
    if planned_per_hour > 0:
        planned = rng.poisson(planned_per_hour * wall / max(1e-12, 1 - planned_per_hour * restart))
        wall = wall + planned * restart
        interruptions = interruptions + planned
    return {"hours": wall, "interruptions": interruptions}


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
    return with_planned_stops(rng, wall, interruptions, planned_per_hour, restart)


def simulate_memory(work: float, tau_m: float, delta_m: float, restart_m: float, tau_s: float, delta_s: float,
                    restart_s: float, mtbi: float, fallback: float, planned_per_hour: float = 0.0,
                    samples: int = 2000, seed: int = 0) -> dict:
    """Monte Carlo of two-level checkpoints, event by event (all runs advance together, one
    interruption at a time). Work is done in segments of tau_m, each followed by an in-memory
    copy (delta_m); every n-th segment (n = tau_s / tau_m) also by a storage write (delta_s). An
    interruption is one the copies cannot serve with probability `fallback`: then the run goes
    back to its last storage checkpoint and restarts in restart_s; otherwise to its last copy,
    restart_m. A restart can itself be interrupted."""
    rng = np.random.default_rng(seed)
    n = max(1, round(tau_s / tau_m))
    total = math.ceil(work / tau_m - 1e-9)
    seg = tau_m + delta_m
    cycle = n * seg + delta_s
    done_segments = np.zeros(samples, dtype=np.int64)
    wall = np.zeros(samples)
    interruptions = np.zeros(samples)
    pending = np.zeros(samples)  # the restart the run needs before working again (0: none)
    active = np.ones(samples, dtype=bool)

    def cost(start, k):  # wall time of segments start+1 .. start+k
        return k * seg + delta_s * ((start + k) // n - start // n)

    while active.any():
        idx = np.flatnonzero(active)
        gap = rng.exponential(mtbi, idx.size)
        lost_all = rng.random(idx.size) < fallback
        start = done_segments[idx]
        available = gap - pending[idx]
        to_finish = cost(start, total - start)
        finishes = available >= to_finish
        finished = idx[finishes]
        wall[finished] += pending[finished] + to_finish[finishes]
        active[finished] = False
        hit = ~finishes
        rows, a, s, lost = idx[hit], np.maximum(available[hit], 0.0), start[hit], lost_all[hit]
        # The segments completed in `a`: up to the next storage boundary, whole cycles, the rest.
        to_boundary = n - s % n
        first = cost(s, to_boundary)
        rest = a - first
        whole = np.floor(np.maximum(rest, 0) / cycle)
        tail = np.minimum(np.floor((rest - whole * cycle).clip(min=0) / seg), n - 1)
        k = np.where(a < first, np.minimum(np.floor(a / seg), to_boundary - 1), to_boundary + whole * n + tail)
        reached = s + k.astype(np.int64)
        done_segments[rows] = np.where(lost, reached // n * n, reached)
        wall[rows] += gap[hit]
        interruptions[rows] += 1
        was_storage = pending[rows] == restart_s
        pending[rows] = np.where(lost | (was_storage & (available[hit] < 0)), restart_s, restart_m)
    return with_planned_stops(rng, wall, interruptions, planned_per_hour, restart_s)


def simulate_replica(work: float, groups: int, rejoin: float, step: float, detect: float, quorum: float,
                     tau_s: float, delta_s: float, restart_s: float, mtbi: float, whole_job_fraction: float,
                     planned_per_hour: float = 0.0, samples: int = 2000, seed: int = 0) -> dict:
    """Monte Carlo of replica groups, event by event. Each of R groups is training or away
    until a time; training groups each add 1/R of full throughput (times the quorum's and the
    storage writes' efficiency). A failure strikes a random group: it is away for `rejoin`, the
    groups still training lose the step in flight and the time to see the failure. A failure
    of the whole job (probability whole_job_fraction), or one that leaves no group training,
    sends every group back to the last storage checkpoint (every tau_s of work) for restart_s."""
    rng = np.random.default_rng(seed)
    efficiency = step / (step + quorum) * tau_s / (tau_s + delta_s)
    rate = efficiency / groups  # work per hour of one training group
    progress = np.zeros(samples)
    now = np.zeros(samples)
    away_until = np.zeros((samples, groups))
    interruptions = np.zeros(samples)
    finished_at = np.zeros(samples)
    active = np.ones(samples, dtype=bool)
    while active.any():
        idx = np.flatnonzero(active)
        gap = rng.exponential(mtbi, idx.size)
        back = np.clip(away_until[idx] - now[idx, None], 0.0, gap[:, None])  # when each group trains again
        gained = rate * (gap[:, None] - back).sum(axis=1)
        need = work - progress[idx]
        finishes = gained >= need
        if finishes.any():
            # Invert the piecewise-linear gain: sorted return times, the gain at each of them.
            b = np.sort(back[finishes], axis=1)
            gain_at = rate * np.maximum(b[:, :, None] - b[:, None, :], 0).sum(axis=2)
            seg = (gain_at < need[finishes, None]).sum(axis=1) - 1  # the last return time before the finish
            rows = np.arange(b.shape[0])
            t = b[rows, seg] + (need[finishes] - gain_at[rows, seg]) / (rate * (seg + 1))
            done = idx[finishes]
            finished_at[done] = now[done] + t
            active[done] = False
        hit = idx[~finishes]
        if hit.size == 0:
            continue
        now[hit] += gap[~finishes]
        progress[hit] += gained[~finishes]
        interruptions[hit] += 1
        victim = rng.integers(0, groups, hit.size)
        training = away_until[hit] <= now[hit, None]
        others = training.sum(axis=1) - training[np.arange(hit.size), victim]
        whole = (rng.random(hit.size) < whole_job_fraction) | (others == 0)
        # Survived: the victim is away for a rejoin; the others lose the step in flight.
        progress[hit] -= np.where(whole, 0.0, rate * (step + detect) * others)
        away_until[hit, victim] = now[hit] + rejoin
        # None survives: everyone back to the last storage checkpoint, away for a storage restart.
        falls = hit[whole]
        progress[falls] = np.floor(progress[falls] / tau_s) * tau_s
        away_until[falls] = now[falls, None] + restart_s
    wall = finished_at
    return with_planned_stops(rng, wall, interruptions, planned_per_hour, restart_s)


def simulate_run(cluster: Cluster, ideal_hours: float, inputs: ReliabilityInputs = ReliabilityInputs(),
                 mode: str = "storage", samples: int = 2000, seed: int = 0) -> dict:
    """The Monte Carlo of one recovery mode for a planned run, summarised: mean and p10/p50/p90
    of the completion time, beside the closed form."""
    closed = recovery_modes(cluster, ideal_hours, inputs)[mode]
    hour = 3600.0
    planned = inputs.planned_per_day / 24
    storage_restart = storage_mode(cluster, ideal_hours, inputs).restart_s / hour
    if mode == "storage":
        runs = simulate(ideal_hours, closed.checkpoint_interval_s / hour, closed.checkpoint_write_s / hour,
                        closed.restart_s / hour, closed.mtbi_hours, planned, samples, seed)
    elif mode == "memory":
        runs = simulate_memory(ideal_hours, closed.memory_interval_s / hour, closed.memory_stall_s / hour,
                               closed.restart_s / hour, closed.checkpoint_interval_s / hour,
                               closed.checkpoint_write_s / hour, storage_restart, closed.mtbi_hours,
                               closed.fallback_per_failure, planned, samples, seed)
    else:
        runs = simulate_replica(ideal_hours, closed.replica_groups, closed.restart_s / hour, cluster.step_s / hour,
                                inputs.replica_detect_s / hour, inputs.quorum_s / hour,
                                closed.checkpoint_interval_s / hour, closed.checkpoint_write_s / hour, storage_restart,
                                closed.mtbi_hours, inputs.whole_job_fraction, planned, samples, seed)
    days = runs["hours"] / 24
    p10, p50, p90 = np.percentile(days, [10, 50, 90])
    return {"mode": mode, "samples": samples, "mean_days": float(days.mean()), "p10_days": float(p10),
            "p50_days": float(p50), "p90_days": float(p90), "closed_form_days": closed.expected_hours / 24,
            "mean_interruptions": float(runs["interruptions"].mean())}

"""The layout of a job: five parallel degrees, checked against the model and batch, and the
DeviceMesh that hands out one named sub-mesh per axis.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, cp, tp. Consecutive ranks
differ in tp first, so tensor parallelism (the chattiest axis) stays inside a node, and
pipeline parallelism (point-to-point, the least traffic) spans nodes.

Expert parallelism (parallel.ep) adds no processes: the dp_shard*cp ranks, seen as one axis,
are cut into efsdp x ep (ep innermost, so an EP group is the closest ranks after tp); the
routed experts are split over ep and FSDP-sharded over dp_replicate x efsdp (docs/moe.md).

Everything here is checked from the config and the world size alone, before any
process group exists or any memory is allocated, so an impossible layout costs nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gigatrain.config import DEGREES, MULTI_STAGE_SCHEDULES, Config, ConfigError, ParallelConfig, global_batch_size
from gigatrain.fault.watchdog import Watchdog
from gigatrain.models.transformer import ModelArgs
from gigatrain.ranks import global_rank, world_size

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Where rank 0 publishes the current start's store prefix (`start_namespace`), and the pauses
# between a rank's looks for rank 0's confirmation (and for a newly published prefix): short
# while rank 0 may be a moment behind, then long enough to keep a large job's ranks off the store.
CURRENT_START_KEY = "gigatrain/current_start"
CONFIRM_PAUSES_S = (0.01, 0.02, 0.05, 0.1, 0.1, 0.1, 0.2, 0.2, 0.5)  # then every 0.5 s


@dataclass(frozen=True)
class LayoutRequest:
    """What the config (or, under parallel.auto, the planner) asks of the layout, before it is
    checked: the settings `_split_batch` cuts the batch by, in the config's names."""

    degrees: dict[str, int]  # dp_replicate, dp_shard, tp, pp, cp; none -1
    global_batch: int
    micro_batch_size: int  # 0: the whole per-rank batch (or, under a pipeline, pp_microbatches)
    pp_schedule: str
    pp_stages_per_rank: int  # 0: 2 for the multi-stage schedules, else 1
    pp_microbatches: int  # 0: from micro_batch_size, else one per pipeline stage
    activation_checkpointing: str
    ep: int = 1  # expert parallelism: parallel.ep, or under parallel.auto the planner's


def resolve_degrees(p: ParallelConfig, n_processes: int) -> dict[str, int]:
    """The five degrees with a -1 inferred from the world size; checks their product."""
    degrees = {name: getattr(p, name) for name in DEGREES}
    fixed = math.prod(v for v in degrees.values() if v != -1)
    for name, value in degrees.items():
        if value == -1:
            if n_processes % fixed:
                others = " x ".join(f"{n}={v}" for n, v in degrees.items() if v not in (-1, 1)) or "1"
                raise ConfigError(f"parallel.{name}=-1 cannot be inferred: the other degrees ({others}) multiply to {fixed}, "
                                  f"which does not divide the world size {n_processes}; run {fixed}*k processes "
                                  f"or change the degrees")
            degrees[name] = n_processes // fixed
    product = math.prod(degrees.values())
    if product != n_processes:
        layout = " x ".join(f"{n}={v}" for n, v in degrees.items())
        raise ConfigError(f"parallel layout {layout} needs {product} processes but this run has {n_processes}; "
                          f"set the parallel degrees so that they multiply to {n_processes}")
    return degrees


def layout_request(cfg: Config, n_processes: int, model_args: ModelArgs) -> LayoutRequest:
    """The config's layout, or under parallel.auto the planner's best one for n_processes (with
    its micro-batch size and activation checkpointing, so the run is the one the planner costed;
    a non-zero train.micro_batch_size or a checkpointing mode other than none stays fixed)."""
    p, t = cfg.parallel, cfg.train
    batch = global_batch_size(cfg)
    if p.auto:
        from gigatrain.plan.layout import auto_layout

        chosen = auto_layout(model_args, n_processes, cfg.data.seq_len, batch, device_catalog_name(),
                             micro_batch_size=t.micro_batch_size or None,
                             activation_checkpointing=None if t.activation_checkpointing == "none"
                             else t.activation_checkpointing)
        return LayoutRequest(chosen.degrees(), batch, chosen.micro_batch_size, chosen.pp_schedule,
                             chosen.pp_stages_per_rank if chosen.pp_schedule in MULTI_STAGE_SCHEDULES else 0, 0,
                             chosen.activation_checkpointing, chosen.ep)
    return LayoutRequest(resolve_degrees(p, n_processes), batch, t.micro_batch_size, p.pp_schedule,
                         p.pp_stages_per_rank, p.pp_microbatches, t.activation_checkpointing, p.ep)


def device_catalog_name() -> str:
    """The planner's hardware-catalog name of this machine's accelerator ('cpu' without one)."""
    if not torch.cuda.is_available():
        return "cpu"
    from gigatrain.plan.catalog import accelerator_for_device

    return accelerator_for_device(torch.cuda.get_device_name()).name


@dataclass(frozen=True)
class ParallelDims:
    """The resolved layout of a run, computed once (`parallel_dims`), in the config's names: the
    five degrees, the pipeline schedule, and how each data-parallel rank's share of the global
    batch is cut. `build_meshes` turns it into DeviceMeshes once processes exist."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp_schedule: str
    stages_per_rank: int  # parallel.pp_stages_per_rank, resolved (1 without a multi-stage schedule)
    microbatches: int  # per data-parallel rank and step (pipeline) or gradient-accumulation steps
    global_batch: int  # sequences per optimizer step (train.batch_size, or batch_tokens / seq_len)
    activation_checkpointing: str  # none | selective (op-level) | full
    ep: int = 1  # expert parallelism, carved out of dp_shard*cp (adds no processes)

    @property
    def efsdp(self) -> int:
        """The dp_shard*cp ranks an expert shard is further FSDP-sharded over (beside
        dp_replicate, over which it is replicated)."""
        return self.dp_shard * self.cp // self.ep

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many distinct slices each global batch is cut into."""
        return self.dp_replicate * self.dp_shard

    @property
    def local_batch(self) -> int:
        """Sequences per data-parallel rank and step."""
        return self.global_batch // self.dp

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward/backward."""
        return self.local_batch // self.microbatches

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def fsdp(self) -> bool:
        """Gradients are reduced (and parameters sharded) over dp_replicate x dp_shard*cp:
        context-parallel ranks see different tokens of the same sequences, so they too
        hold partial gradients."""
        return self.dp_replicate * self.dp_shard * self.cp > 1

    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def to_dict(self) -> dict:
        """The resolved layout in the config's (and the planner's `Layout`'s) names, as run.json
        records it for calibration."""
        return {**self.degrees(), "ep": self.ep, "pp_schedule": self.pp_schedule, "pp_stages_per_rank": self.stages_per_rank,
                "micro_batch_size": self.micro_batch_size, "microbatches": self.microbatches,
                "local_batch": self.local_batch, "global_batch": self.global_batch,
                "activation_checkpointing": self.activation_checkpointing}

    def build_meshes(self, device_type: str) -> dict[str, DeviceMesh]:
        """One 1-D mesh per axis, plus the views the axes combine into: "dp" (the ranks a
        global batch is sliced over) and "fsdp" (dp_replicate x dp_shard*cp, the 2-D mesh
        FSDP shards over: context-parallel ranks also hold partial gradients)."""
        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("world",))
        axes = world._unflatten(0, tuple(getattr(self, a) for a in AXES), AXES)
        data = world._unflatten(0, (self.pp, self.dp, self.cp, self.tp), ("pp", "dp", "cp", "tp"))
        sharding = world._unflatten(0, (self.pp, self.dp_replicate, self.dp_shard * self.cp, self.tp),
                                    ("pp", "dp_replicate", "dp_shard_cp", "tp"))
        meshes = {axis: axes[axis] for axis in AXES}
        meshes["dp"] = data["dp"]
        meshes["fsdp"] = sharding["dp_replicate", "dp_shard_cp"]
        if self.ep > 1:
            # dp_shard*cp = efsdp x ep, ep innermost: the ranks one EP group exchanges tokens
            # between, and the ranks that hold the same experts (sharded over by FSDP).
            experts = world._unflatten(0, (self.pp, self.dp_replicate, self.efsdp, self.ep, self.tp),
                                       ("pp", "dp_replicate", "efsdp", "ep", "tp"))
            meshes["ep"] = experts["ep"]
            meshes["efsdp"] = experts["dp_replicate", "efsdp"]
        return meshes


def parallel_dims(cfg: Config, model_args: ModelArgs, n_processes: int | None = None) -> ParallelDims:
    """Resolve and check the layout against the model, sequence length and batch; every
    broken constraint is one line saying what would fix it. The config is only read: the
    run keeps its degrees as written (-1, auto), so that it resumes under another number of
    processes."""
    n_processes = world_size() if n_processes is None else n_processes
    request = layout_request(cfg, n_processes, model_args)
    d = request.degrees
    seq_len = cfg.data.seq_len
    if d["tp"] > 1:
        for name in ("n_heads", "n_kv_heads"):
            value = getattr(model_args, name)
            if value % d["tp"]:
                raise ConfigError(f"parallel.tp={d['tp']} does not divide model.{name}={value}; "
                                  f"use a tp that divides both n_heads and n_kv_heads")
        if seq_len % d["tp"]:
            raise ConfigError(f"parallel.tp={d['tp']} does not divide data.seq_len={seq_len}: sequence parallelism "
                              f"splits the sequence over tp ranks; pick a seq_len divisible by {d['tp']}")
    if d["cp"] > 1 and seq_len % (2 * d["cp"] * d["tp"]):
        raise ConfigError(f"data.seq_len={seq_len} is not divisible by 2*parallel.cp{'*parallel.tp' if d['tp'] > 1 else ''}="
                          f"{2 * d['cp'] * d['tp']}: context parallelism gives each rank two equal chunks; "
                          f"use a seq_len that is a multiple of {2 * d['cp'] * d['tp']}")
    check_ep(request, model_args)
    try:
        stages_per_rank, microbatches = _split_batch(request, model_args)
    except ConfigError as err:
        raise ConfigError(f"{err}{_fitting_batch_hint(cfg, request, model_args, n_processes)}") from None
    return ParallelDims(pp=d["pp"], dp_replicate=d["dp_replicate"], dp_shard=d["dp_shard"], cp=d["cp"], tp=d["tp"],
                        pp_schedule=request.pp_schedule, stages_per_rank=stages_per_rank, microbatches=microbatches,
                        global_batch=request.global_batch, activation_checkpointing=request.activation_checkpointing,
                        ep=request.ep)


def check_ep(request: LayoutRequest, model_args: ModelArgs) -> None:
    """Expert parallelism borrows its ranks from dp_shard*cp (see the module docstring)."""
    ep, d = request.ep, request.degrees
    if ep == 1:
        return
    if not model_args.is_moe:
        raise ConfigError(f"parallel.ep={ep} needs a mixture-of-experts model, but this model is dense "
                          f"(model.n_experts={model_args.n_experts}); set parallel.ep=1")
    if model_args.n_experts % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide model.n_experts={model_args.n_experts}: each ep rank holds "
                          f"n_experts/ep whole experts; use an ep that divides {model_args.n_experts}")
    borrowed = d["dp_shard"] * d["cp"]
    if borrowed % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide parallel.dp_shard*parallel.cp={d['dp_shard']}*{d['cp']}="
                          f"{borrowed}: the EP group is carved out of those ranks (it adds no processes); "
                          f"use an ep that divides {borrowed} or raise dp_shard")


def _split_batch(request: LayoutRequest, model_args: ModelArgs) -> tuple[int, int]:
    """(stages per rank, microbatches): how each data-parallel rank's share of the global
    batch is cut, for the resolved degrees; every batch constraint is checked here."""
    d = request.degrees
    dp = d["dp_replicate"] * d["dp_shard"]
    if request.global_batch % dp:
        raise ConfigError(f"train.batch_size={request.global_batch} is not divisible by the data-parallel degree "
                          f"dp_replicate*dp_shard={dp}; use a batch size that is a multiple of {dp}")
    local_batch = request.global_batch // dp
    if d["pp"] > 1:
        return _pipeline_shape(request, model_args, local_batch)
    micro = request.micro_batch_size or local_batch
    if local_batch % micro:
        raise ConfigError(f"train.micro_batch_size={micro} does not divide the per-rank batch "
                          f"batch_size/dp={local_batch}; pick a micro batch that divides {local_batch}")
    return 1, local_batch // micro


def fitting_batch_sizes(request: LayoutRequest, model_args: ModelArgs, count: int = 3) -> list[int]:
    """Global batch sizes this resolved layout accepts with its micro-batch and pipeline
    settings: the largest below the requested one and the first `count - 1` above it. Found by
    trying multiples of the data-parallel degree against `_split_batch` itself, so the
    suggestion never disagrees with the check."""
    d = request.degrees
    dp = d["dp_replicate"] * d["dp_shard"]
    below, above = [], []
    for size in range(dp, dp * 4096 + 1, dp):
        try:
            _split_batch(dataclasses.replace(request, global_batch=size), model_args)
        except ConfigError:
            continue
        (below if size < request.global_batch else above).append(size)
        if len(above) == count - 1:
            break
    return below[-1:] + above


def _fitting_batch_hint(cfg: Config, request: LayoutRequest, model_args: ModelArgs, n_processes: int) -> str:
    sizes = fitting_batch_sizes(request, model_args)
    if not sizes:
        return ""  # not a matter of the batch size: the message already says what to change
    key = "train.batch_size"
    if cfg.train.batch_tokens:
        key, sizes = "train.batch_tokens", [size * cfg.data.seq_len for size in sizes]
    choices = ", ".join(map(str, sizes[:-1])) + (" or " if len(sizes) > 1 else "") + str(sizes[-1])
    micro = request.micro_batch_size
    return f"; with {n_processes} processes{f' and train.micro_batch_size={micro}' if micro else ''}, {key} can be {choices}"


def _pipeline_shape(request: LayoutRequest, model_args: ModelArgs, local_batch: int) -> tuple[int, int]:
    pp, schedule, micro = request.degrees["pp"], request.pp_schedule, request.micro_batch_size
    from torch.distributed.pipelining import schedules

    if not hasattr(schedules, "Schedule" + schedule):
        raise ConfigError(f"parallel.pp_schedule={schedule} is not in the installed PyTorch "
                          f"{torch.__version__}; use 1F1B, GPipe or Interleaved1F1B")
    multi = schedule in MULTI_STAGE_SCHEDULES
    stages_per_rank = request.pp_stages_per_rank or (2 if multi else 1)
    if not multi and stages_per_rank != 1:
        raise ConfigError(f"parallel.pp_stages_per_rank={stages_per_rank} needs a multi-stage schedule; "
                          f"use parallel.pp_schedule=Interleaved1F1B or one of {', '.join(MULTI_STAGE_SCHEDULES)}")
    if multi and stages_per_rank < 2:
        raise ConfigError(f"parallel.pp_schedule={schedule} runs several stages per rank; "
                          f"set parallel.pp_stages_per_rank to 2 or more (or 0 for 2)")
    n_stages = pp * stages_per_rank
    if model_args.n_layers % n_stages:
        raise ConfigError(f"model.n_layers={model_args.n_layers} cannot be split into {n_stages} equal pipeline stages "
                          f"(parallel.pp={pp} x {stages_per_rank} per rank); use a layer count divisible by {n_stages}")
    microbatches = request.pp_microbatches
    if not microbatches:
        microbatches = local_batch // micro if micro else pp
    elif micro and micro * microbatches != local_batch:
        raise ConfigError(f"train.micro_batch_size={micro} x parallel.pp_microbatches={microbatches} "
                          f"must equal the per-rank batch batch_size/dp={local_batch}; set one of them to 0")
    if local_batch % microbatches:
        raise ConfigError(f"parallel.pp_microbatches={microbatches} does not divide the per-rank batch "
                          f"batch_size/dp={local_batch}; use a divisor of {local_batch} or a larger train.batch_size")
    if multi and microbatches % pp:
        raise ConfigError(f"parallel.pp_schedule={schedule} needs parallel.pp_microbatches={microbatches} "
                          f"to be a multiple of parallel.pp={pp}")
    return stages_per_rank, microbatches


def init_distributed(device: torch.device, startup_timeout_s: float, run_dir: Path) -> bool:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) when there is more than one
    process; returns whether this call created it (and so should destroy it).

    Each start-up phase (the store, the namespace, the process group, a first barrier) must end
    within `startup_timeout_s` (fault.startup_timeout_s; 0: no bound), or the start-up watchdog
    writes every thread's stack to RUN_DIR/stacks/, prints which phase it waited for, and exits 3."""
    if world_size() == 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    watchdog = Watchdog(startup_timeout_s, run_dir, global_rank())
    try:
        watchdog.beat(f"start-up: the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        store, rank, size = next(dist.rendezvous("env://"))
        watchdog.beat(f"start-up: all {size} processes to reach the rendezvous")
        namespace = start_namespace(store, rank, size)
        watchdog.beat(f"start-up: the {backend} process group to connect")
        dist.init_process_group(backend, store=dist.PrefixStore(namespace, store), rank=rank, world_size=size,
                                device_id=device if device.type == "cuda" else None)
        watchdog.beat("start-up: the first barrier")
        dist.barrier()
    finally:
        watchdog.stop()
    return True


def start_namespace(store: dist.Store, rank: int, size: int) -> str:
    """A store prefix that no earlier start of this job used, agreed by all its processes.

    torchrun hosts the store and keeps it across its restarts (TCPStore sharing, the default
    since PyTorch 2.5), and a process group writes its keys (each rank's address among them)
    under the same names every time: a restarted process could read a dead predecessor's
    address and fail (`Gloo connectFullMesh failed ... Connection refused`) or hang.
    TORCHELASTIC_RESTART_COUNT cannot name the start: each node's torchrun counts only its
    own restarts. So rank 0 draws a fresh name and publishes it; every other rank answers it
    with a fresh nonce of its own, and takes the name once rank 0 has confirmed that nonce.
    A rank that read an earlier start's name is never confirmed (torchrun stops every process
    of a start before the next begins), and reads the name again. The process group, and every
    group made from it (DeviceMesh, new_group), live under it."""
    if rank == 0:
        name = f"gigatrain/{uuid.uuid4().hex}"
        store.set(CURRENT_START_KEY, name)
        for peer in range(1, size):
            nonce = store.get(f"{name}/hello/{peer}").decode()
            store.set(f"gigatrain/confirmed/{nonce}", "1")
        return name
    nonce = uuid.uuid4().hex
    said_hello_to = None
    for pause in itertools.chain(CONFIRM_PAUSES_S, itertools.repeat(CONFIRM_PAUSES_S[-1])):
        name = store.get(CURRENT_START_KEY).decode()
        if name != said_hello_to:
            # A new name: rank 0 of this start has published it (or this is the first read).
            # Answered at once, not after the pauses run out: a restarted rank that read its
            # dead predecessor's name lost ~2 s of every second restart that way.
            store.set(f"{name}/hello/{rank}", nonce)
            said_hello_to = name
        # Polled, not waited for: a timed-out wait leaves a TCPStore client unusable.
        time.sleep(pause)
        if store.check([f"gigatrain/confirmed/{nonce}"]):
            return name

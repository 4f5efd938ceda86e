"""`gigatrain launch slurm|k8s`: the files that start one training run on many nodes.

Every target runs the same thing on each node: torchrun with a c10d rendezvous, starting
one process per GPU (or, with `cpu`, per CPU worker), each running
`python -m gigatrain train CONFIG --section.key=value ...`. This module holds what the
targets share: the checked description of the job (`Job`); `slurm` and `k8s` render it as
text. Nothing here starts a process or touches the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gigatrain.config import Config, ConfigError, load_config, resolve_model_args

DEFAULT_PORT = 29500
LIGHTHOUSE_PORT = 29510  # torchft_lighthouse's default


class LaunchError(ValueError):
    """A launch request that cannot work; the message is one line meant for the user."""


@dataclass(frozen=True)
class Job:
    """One training run over `nodes` x `procs_per_node` processes, its config checked."""

    config_path: Path  # absolute: the job may start in another directory
    config_text: str
    overrides: tuple[str, ...]  # as given, plus what the launch itself implies (train.device=cpu)
    cfg: Config
    nodes: int
    procs_per_node: int
    cpu: bool
    max_restarts: int
    port: int
    name: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def train_args(self, config_path: str | None = None) -> list[str]:
        """`-m gigatrain train CONFIG OVERRIDES`, what torchrun runs in every process."""
        return ["-m", "gigatrain", "train", config_path or str(self.config_path), *self.overrides]


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise LaunchError(f"{name}={value} is not valid; it must be at least {minimum}")


def check_layout(cfg: Config, world_size: int) -> None:
    """The trainer's own layout check (degrees against the world size, tp against the heads,
    dp against the batch, stages against the layers), run at the desk so that a wrong layout
    fails now, not after the job has waited in a queue. `parallel.auto` is the planner's
    choice on the nodes."""
    if cfg.parallel.auto:
        return
    from gigatrain.parallel.mesh import parallel_dims

    try:
        parallel_dims(cfg, resolve_model_args(cfg), world_size)
    except ConfigError as err:
        raise LaunchError(f"{err} (this launch starts nodes x gpus-per-node = {world_size} processes)") from None


def _default_name(cfg: Config) -> str:
    return "gigatrain-" + cfg.run.name


def prepare_job(config_path: str | Path, overrides: list[str] | tuple[str, ...], *, nodes: int, procs_per_node: int,
                cpu: bool = False, max_restarts: int = 0, port: int = DEFAULT_PORT, name: str | None = None) -> Job:
    """Check a launch request and load its config exactly as every process will."""
    _at_least("--nodes", nodes, 1)
    _at_least("--gpus-per-node", procs_per_node, 1)
    _at_least("--max-restarts", max_restarts, 0)
    if not 1024 <= port <= 65535:
        raise LaunchError(f"--port={port} is not valid; use a free TCP port in 1024-65535 (default {DEFAULT_PORT})")
    path = Path(config_path)
    if not path.is_file():
        raise LaunchError(f"config file {str(path)!r} does not exist; pass an existing TOML file (see configs/)")
    overrides = tuple(overrides)
    cfg = load_config(path, overrides)  # ConfigError names the bad key
    if cpu:
        if cfg.train.device == "cuda":
            raise LaunchError("--cpu conflicts with train.device=cuda; drop one of them")
        if cfg.train.device != "cpu":
            # CPU processes even where the nodes have GPUs: the trainer then uses gloo.
            overrides += ("--train.device=cpu",)
            cfg.train.device = "cpu"
    groups = replica_groups(cfg)
    if nodes % groups:
        raise LaunchError(f"--nodes={nodes} cannot be split into fault.replica_groups={groups} replica groups of "
                          f"whole nodes; use a multiple of {groups} nodes")
    check_layout(cfg, nodes * procs_per_node // groups)
    return Job(config_path=path.absolute(), config_text=path.read_text(), overrides=overrides, cfg=cfg, nodes=nodes,
               procs_per_node=procs_per_node, cpu=cpu, max_restarts=max_restarts, port=port,
               name=name or _default_name(cfg))


def replica_groups(cfg: Config) -> int:
    """How many torchrun jobs the launch starts: one per replica group with fault.recovery=replica
    (each meets the others at the torchft Lighthouse), else one."""
    if cfg.fault.recovery != "replica":
        return 1
    if cfg.fault.replica_groups < 2:
        raise LaunchError(f"fault.replica_groups={cfg.fault.replica_groups} is not valid with fault.recovery=replica; "
                          "use 2 or more")
    return cfg.fault.replica_groups


def replica_overrides(group: int | str, groups: int) -> tuple[str, ...]:
    """What one replica group's processes are told beyond the job's own overrides (`group`: its
    id, or a shell word that holds it)."""
    return (f"--fault.replica_groups={groups}", f"--fault.replica_id={group}")


def lighthouse_args(port: int = LIGHTHOUSE_PORT) -> list[str]:
    """torchft's Lighthouse, where the replica groups meet for each step's quorum: one replica
    is enough to go on, a quorum tick of 100 ms, 10 s for a restarted group to join."""
    return ["torchft_lighthouse", "--min_replicas", "1", "--quorum_tick_ms", "100", "--join_timeout_ms", "10000",
            "--bind", f"[::]:{port}"]


def require_match(what: str, value: str, pattern: str, hint: str) -> None:
    if not re.fullmatch(pattern, value):
        raise LaunchError(f"{what} {value!r} is not valid; {hint}")


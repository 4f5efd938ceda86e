"""`gigatrain launch slurm|k8s`: the files that start one training run on many nodes.

Every target runs the same thing on each node: torchrun with a c10d rendezvous, starting
one process per GPU (or, with `cpu`, per CPU worker), each running
`python -m gigatrain train CONFIG --section.key=value ...`. This module holds what the
targets share: the checked description of the job (`Job`); `slurm` and `k8s` render it as
text. Nothing here starts a process or touches the network.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from gigatrain.config import Config, load_config, resolve_model_args

DEFAULT_PORT = 29500
AXES = ("dp_replicate", "dp_shard", "tp", "pp", "cp")


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
    """The parallel degrees must multiply to the number of processes (one may be -1, inferred,
    when the others divide it). Checked here so a wrong layout fails at the desk, not after
    the job has waited in a queue. `parallel.auto` is the planner's choice on the nodes."""
    p = cfg.parallel
    if p.auto:
        return
    degrees = {name: getattr(p, name) for name in AXES}
    fixed = math.prod(v for v in degrees.values() if v != -1)
    inferred = [name for name, v in degrees.items() if v == -1]
    layout = " x ".join(f"{name}={v}" for name, v in degrees.items())
    if inferred and world_size % fixed:
        raise LaunchError(f"parallel.{inferred[0]}=-1 cannot be inferred: the other degrees ({layout}) multiply to "
                          f"{fixed}, which does not divide the {world_size} processes of this launch; "
                          f"change --nodes/--gpus-per-node or the degrees")
    if not inferred and fixed != world_size:
        raise LaunchError(f"parallel layout {layout} needs {fixed} processes but this launch starts {world_size} "
                          f"(nodes x gpus-per-node); make them equal or set one degree to -1")
    # Then the trainer's own check, from the config and the world size alone: tp divides the
    # heads, dp the batch, the pipeline stages the layers.
    from gigatrain.parallel.mesh import parallel_dims

    parallel_dims(cfg, resolve_model_args(cfg), world_size)


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
    check_layout(cfg, nodes * procs_per_node)
    return Job(config_path=path.absolute(), config_text=path.read_text(), overrides=overrides, cfg=cfg, nodes=nodes,
               procs_per_node=procs_per_node, cpu=cpu, max_restarts=max_restarts, port=port,
               name=name or _default_name(cfg))


def require_match(what: str, value: str, pattern: str, hint: str) -> None:
    if not re.fullmatch(pattern, value):
        raise LaunchError(f"{what} {value!r} is not valid; {hint}")


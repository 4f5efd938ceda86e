"""fault.recovery=memory: when the trainer copies its state into host memory, and whether a
resume loads those copies or the storage checkpoint (docs/fault-tolerance.md). The copies'
files and their exchange between hosts are gigatrain.checkpoint.memory's; CheckpointManager
owns this component."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

import torch.distributed as dist

from gigatrain.checkpoint.dcp import CheckpointError, _gather
from gigatrain.checkpoint.memory import Hosts, MemoryStore, Restored, layout_tag
from gigatrain.config import Config, ConfigError
from gigatrain.ranks import global_rank, is_main_process
from gigatrain.rundir import RunDir


def ranks_per_host(configured: int, world: int) -> int:
    """fault.ranks_per_host, or torchrun's LOCAL_WORLD_SIZE if it is 0; it must divide the world."""
    per_host = configured or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_host < 1 or world % per_host:
        raise ConfigError(f"fault.ranks_per_host={per_host} does not divide the {world} processes into hosts; "
                          f"set it to the number of processes on each host (0: torchrun's LOCAL_WORLD_SIZE)")
    return per_host


def run_folder_name(run_dir: RunDir, group=None) -> str:
    """The run's folder under fault.memory_dir: its directory's name, and a hash of its path and
    of a token kept in the run directory (a new run at the same path, or a copy of the run
    elsewhere, gets another folder and never loads this run's copies). Rank 0 creates the
    token; every rank gets rank 0's answer."""
    name = None
    if is_main_process():
        token_file = run_dir.memory_token
        if not token_file.is_file():
            token_file.parent.mkdir(parents=True, exist_ok=True)
            token_file.write_text(secrets.token_hex(16) + "\n")
        identity = f"{run_dir.path.resolve()}\n{token_file.read_text().strip()}"
        name = f"{run_dir.path.resolve().name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    return _gather(name, group)[0]


class MemoryCheckpoints:
    """Every fault.memory_every steps each rank's state goes into its host's memory folder and
    its peer host's; at a resume, the newest state every rank can get back (from its own host
    or its peer's) is loaded if it is at least as new as the storage checkpoint."""

    def __init__(self, cfg: Config, run_dir: RunDir, world: int, layout: dict, event):
        f = cfg.fault
        self.every = f.memory_every
        self.event = event
        per_host = ranks_per_host(f.ranks_per_host, world)
        hosts = Hosts(global_rank(), world, per_host)
        # The exchanges run on a gloo group of their own: CPU tensors on any backend, and never
        # interleaved with the training collectives or the background checkpoint's.
        group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        folder_name = run_folder_name(run_dir, group)
        self.store = MemoryStore(Path(f.memory_dir) / folder_name, folder_name, hosts,
                                 layout_tag(world, per_host, layout), group, on_event=event)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, parts, optimizers, trainer_state: dict) -> float:
        """Copy this step's state (written in the background: a `memory_checkpoint` event once
        it is); returns the seconds training stalled for it."""
        return self.store.save(step, parts, optimizers, trainer_state)

    def wait(self) -> bool:
        return self.store.wait()

    def close(self) -> None:
        self.store.close()

    def restore(self, storage_step: int | None, parts, optimizers, check_state) -> Restored | None:
        """Load the newest complete in-memory state if it is at least as new as the storage
        checkpoint at `storage_step` (None: there is none); None, with an event saying why, if
        storage should be loaded instead."""
        started = time.perf_counter()
        step, foreign, own = self.store.newest_complete()
        reason = None
        if step is None:
            if foreign:
                reason = ("the copies in memory were written under another layout (world size, ranks per host "
                          "or parallel degrees); a copy only loads into the layout that wrote it")
            else:
                return None  # nothing in memory: a new run, or a host without copies
        elif storage_step is not None and storage_step > step:
            reason = f"the storage checkpoint (step {storage_step}) is newer than the newest copy in memory (step {step})"
        if reason is None:
            try:
                restored = self.store.load(step, own, parts, optimizers, check_state)
            except CheckpointError as err:
                reason = f"a copy in memory does not fit: {err}"
        if reason is not None:
            self.event({"event": "memory_fallback", "step": step, "storage_step": storage_step, "reason": reason})
            return None
        self.event({"event": "memory_restore", "step": step, "loaded_from": restored.loaded_from,
                    "from_peer": restored.from_peer, "load_s": time.perf_counter() - started})
        return restored

    def discard_after(self, step: int) -> None:
        self.store.discard_after(step)

    def clear(self) -> None:
        self.store.clear()

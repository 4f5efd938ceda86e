"""Checkpoints in torch.distributed.checkpoint (DCP) format, committed atomically.

Layout of a run's checkpoints::

    checkpoints/
      step_00000500/          one committed checkpoint
        .metadata, *.distcp   DCP: tensors only (model, optimizer state, RNG), keyed by name
        trainer_state.json    step, data-loader position, counters: plain JSON
      latest                  the name of the newest committed checkpoint

A checkpoint is written into a temporary folder, renamed into place once whole,
and only then named in ``latest``; a crash at any point leaves the previous
checkpoint intact. DCP files hold tensors only, so loading never unpickles an
arbitrary object, and they reshard: a checkpoint saved under one layout loads
under another.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gigatrain.paths import write_atomic

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names it."""


@contextlib.contextmanager
def _single_process_ok():
    # DCP warns that it assumes one process when no process group exists; that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_tensors(parts: list[nn.Module]) -> dict:
    """The parts' weights by their names in the whole model (pipeline stages keep those names)."""
    return {name: tensor for part in parts for name, tensor in get_model_state_dict(part).items()}


def _optimizer_tensors(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """The optimizers' per-parameter tensors keyed by parameter name; hyper-parameters are
    left out on purpose: they come from the config, and leaving them out keeps the DCP
    files free of pickled objects."""
    return {name: state for part, optimizer in zip(parts, optimizers)
            for name, state in get_optimizer_state_dict(part, optimizer)["state"].items()}


def save(directory: Path, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None,
         trainer_state: dict, keep: int) -> Path:
    """Write checkpoint `step` under `directory`, commit it, and prune to the newest `keep`.

    Every rank writes its shards (DCP); rank 0 alone commits, once all have finished.
    """
    final = directory / checkpoint_name(step)
    tmp = directory / (TMP_PREFIX + final.name)
    if _is_main():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    tensors = {"model": _model_tensors(parts), "rng": {"torch_cpu": torch.get_rng_state()}}
    if optimizers is not None:
        tensors["optimizer"] = _optimizer_tensors(parts, optimizers)
    with _single_process_ok():
        dcp.save(tensors, checkpoint_id=str(tmp))
    if _is_main():
        write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. resumed and stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(directory / LATEST_FILE, final.name + "\n")
        _fsync_dir(directory)
        prune(directory, keep)
    _barrier()
    return final


def committed(directory: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def prune(directory: Path, keep: int) -> None:
    for old in committed(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The checkpoint named by `latest`, or the newest committed one if the pointer is missing."""
    pointer = directory / LATEST_FILE
    if pointer.exists():
        named = directory / pointer.read_text().strip()
        if (named / STATE_FILE).exists():
            return named
    found = committed(directory)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({err}); delete it to fall back to an older one") from None


def load(path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None = None) -> dict:
    """Load weights (and optimizer state and RNG, when optimizers are given) in place, whatever
    the layout they were saved under; returns the trainer state saved with them."""
    trainer_state = read_trainer_state(path)
    # Each part's state dicts once: they name what DCP loads, and which names go back to which part.
    model_dicts = [get_model_state_dict(part) for part in parts]
    tensors = {"model": {name: t for own in model_dicts for name, t in own.items()}}
    if optimizers is not None:
        optimizer_dicts = [get_optimizer_state_dict(part, optimizer) for part, optimizer in zip(parts, optimizers)]
        tensors["optimizer"] = {name: state for full in optimizer_dicts for name, state in full["state"].items()}
        tensors["rng"] = {"torch_cpu": torch.get_rng_state()}
    try:
        with _single_process_ok():
            dcp.load(tensors, checkpoint_id=str(path))
    except Exception as err:  # DCP raises many kinds; the user needs the path and the cause
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line}") from None
    for part, own in zip(parts, model_dicts):
        set_model_state_dict(part, {name: tensors["model"][name] for name in own}, options=StateDictOptions(strict=True))
    if optimizers is not None:
        for part, optimizer, full in zip(parts, optimizers, optimizer_dicts):
            full["state"] = {name: tensors["optimizer"][name] for name in full["state"]}
            set_optimizer_state_dict(part, optimizer, full)
        torch.set_rng_state(tensors["rng"]["torch_cpu"])
    return trainer_state

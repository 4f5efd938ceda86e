"""The trainer's checkpoints: when to save, the final checkpoint, resuming (a run's checkpoints
only load into the model, tokenizer and data they were trained with), restoring for a
rollback (through the same code as resuming), and what a checkpoint costs the time budget.
The files themselves are gigatrain.checkpoint.dcp's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.config import Config, ConfigError, from_dict
from gigatrain.data.loader import BatchLoader, TokenData
from gigatrain.data.tokenizers import load_tokenizer
from gigatrain.models.transformer import ModelArgs, Transformer
from gigatrain.paths import sha256_file
from gigatrain.ranks import world_size
from gigatrain.rundir import RunDir
from gigatrain.train.memory import MemoryCheckpoints
from gigatrain.train.schedule import schedule_horizon

# A checkpoint's cost until one is measured: the state at a slow network filesystem's pace.
ASSUMED_WRITE_BYTES_PER_S = 100e6


@dataclass
class TrainState:
    """Where training stands, besides the weights: what a checkpoint gives back with them."""
    step: int = 0
    train_time_s: float = 0.0  # seconds in optimizer steps, over every process of the run
    schedule_steps: int = 0  # the learning-rate schedule's horizon (train.schedule)


def identity(args: ModelArgs, data: TokenData) -> dict:
    """What a run's checkpoints must be resumed with (saved in each one's trainer state): the
    model's shape, the tokenizer (by content) and the data (by its shards' checksums, wherever
    it lies)."""
    tokenizer_file = Path(data.path) / data.manifest["tokenizer"]["file"]  # a plain name: TokenData checked it
    shards = {name: [shard["sha256"] for shard in split["shards"]] for name, split in sorted(data.manifest["splits"].items())}
    return {"model": model_identity(args),
            "tokenizer": tokenizer_identity(data.tokenizer.kind, data.vocab_size, tokenizer_file),
            "data": {"sha256": hashlib.sha256(json.dumps(shards).encode()).hexdigest(), "path": str(data.path)}}


def model_identity(args: ModelArgs) -> dict:
    """The model's part of the identity: its shape, max_seq_len aside (it sizes rotary tables
    that are computed, not saved)."""
    return {name: value for name, value in dataclasses.asdict(args).items() if name != "max_seq_len"}


def tokenizer_identity(kind: str, vocab_size: int, file: Path) -> dict:
    """The tokenizer's part of the identity: its file by content, as prepare wrote it."""
    return {"kind": kind, "vocab_size": vocab_size, "sha256": sha256_file(file)}


def identity_differences(saved: dict, current: dict, allow_data_change: bool) -> list[str]:
    """What differs between a checkpoint's identity and this process's, each with its fix."""
    new_run = "start a new run with --run.dir=<new dir>"
    differences = []
    # A field the checkpoint does not name is newer than the checkpoint: it had the default.
    defaults = {field.name: field.default for field in dataclasses.fields(ModelArgs)}
    changed = {name: (saved["model"].get(name, defaults.get(name)), value) for name, value in current["model"].items()
               if saved["model"].get(name, defaults.get(name)) != value}
    if changed:
        # Every ModelArgs field is a model.* override, so the saved values themselves are the fix
        # (also where a preset changed under the run, as the llama3 presets' rope scaling did).
        was = ", ".join(f"model.{name} {old} -> {new}" for name, (old, new) in changed.items())
        back = " ".join(f"--model.{name}={old}" for name, (old, _) in changed.items())
        differences.append(f"the model differs ({was}): resume with {back}, or {new_run}")
    old, new = saved["tokenizer"], current["tokenizer"]
    if old != new:
        differences.append(f"the tokenizer differs ({old['kind']}, {old['vocab_size']} tokens, sha256 {old['sha256'][:12]} -> "
                           f"{new['kind']}, {new['vocab_size']} tokens, sha256 {new['sha256'][:12]}): a run cannot change "
                           f"its tokenizer; {new_run}")
    old, new = saved["data"], current["data"]
    # None: no data yet (an imported model at step 0), so any data continues it.
    if old is not None and old["sha256"] != new["sha256"] and not allow_data_change:
        differences.append(f"the data differs ({old['path']} -> {new['path']}, other shards): to continue on it on "
                           f"purpose pass --data.allow_change=true, or {new_run}")
    return differences


class CheckpointManager:
    """Saves every train.checkpoint_every steps (in the background unless
    train.async_checkpoint=false), writes the final checkpoint, and restores the latest one
    for a resume or a rollback. With fault.recovery=memory it also keeps in-memory copies
    every fault.memory_every steps (`memory`), and a resume loads the newer of those and the
    storage checkpoint."""

    def __init__(self, cfg: Config, run_dir: RunDir, parallel, optimizers: list, loader: BatchLoader,
                 state: TrainState, *, model_args: ModelArgs, data: TokenData, layout: dict, tokens_per_step: int,
                 faults, event, is_main: bool):
        self.cfg = cfg
        self.run_dir = run_dir
        self.parallel, self.optimizers, self.loader, self.state = parallel, optimizers, loader, state
        self.model_args, self.data, self.layout, self.tokens_per_step = model_args, data, layout, tokens_per_step
        self.event, self.is_main = event, is_main
        # Kept for this process's own restores: resume clears the config's switch so that
        # config.json does not carry it, and a rollback may return to the checkpoint it allowed.
        self.allow_data_change = cfg.data.allow_change
        self.cost_s = self.assumed_cost_s()  # one checkpoint from its start to its commit, for the time limit
        self.cost_measured = False
        # Where this process's state came from: "storage" (a checkpoint here), "memory" or "peer"
        # (in-memory copies, this host's or its peer's), "replica" (a healthy replica group's
        # live state, train/replica.py), None (a new run).
        self.loaded_from: str | None = None
        t = cfg.train
        self.every = t.checkpoint_every
        self.checkpointer = checkpoint.Checkpointer(run_dir.checkpoints, t.keep_checkpoints, t.async_checkpoint,
                                                    faults=faults, on_event=self.on_checkpoint_event)
        self.memory = (MemoryCheckpoints(cfg, run_dir, world_size(), layout, event)
                       if cfg.fault.recovery == "memory" else None)

    @property
    def directory(self) -> Path:
        return self.run_dir.checkpoints

    def due(self, step: int) -> bool:
        """A storage checkpoint or an in-memory copy is due after `step`."""
        return step % self.every == 0 or (self.memory is not None and self.memory.due(step))

    # -- saving -----------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        s = self.state
        return {"step": s.step, "loader": self.loader.state_dict(), "train_time_s": s.train_time_s,
                "tokens_seen": s.step * self.tokens_per_step, "layout": self.layout,
                "schedule_steps": s.schedule_steps, "identity": self.identity}

    def save(self) -> float:
        """What is due at the current step (a storage checkpoint, started; an in-memory copy);
        returns the seconds training stalled for them."""
        step, stall = self.state.step, 0.0
        if step % self.every == 0:
            stall += self.save_to_storage()
        if self.memory is not None and self.memory.due(step):
            stall += self.memory.save(step, self.parallel.parts, self.optimizers, self.trainer_state())
        return stall

    def save_to_storage(self) -> float:
        """Start a storage checkpoint of the current step; returns the seconds training stalled for it."""
        return self.checkpointer.save(self.state.step, self.parallel.parts, self.optimizers, self.trainer_state())

    def final_checkpoint(self) -> None:
        """A checkpoint the process must not exit without: save and wait for the commit."""
        started = time.perf_counter()
        self.save_to_storage()
        if not self.checkpointer.wait():
            raise checkpoint.CheckpointWriteError(
                f"the checkpoint at step {self.state.step} could not be written ({self.checkpointer.last_failure}); "
                f"the run can resume from the previous one once the storage is fixed")
        if self.checkpointer.async_save:
            self.event({"event": "final_checkpoint_wait", "step": self.state.step,
                        "wait_s": time.perf_counter() - started})

    def finish(self, trained: bool) -> None:
        """The end of the loop: the final checkpoint if this process trained (or its run has
        none yet, or only an in-memory copy holds this state); otherwise the latest checkpoint
        already holds it. Storage then holds the newest state: the in-memory copies go."""
        if trained or self.loaded_from in ("memory", "peer"):
            self.final_checkpoint()
        else:
            self.checkpointer.wait()
        if self.memory is not None:
            self.memory.clear()

    def close(self) -> None:
        try:
            self.checkpointer.close()
        finally:
            if self.memory is not None:
                self.memory.close()

    # -- restoring --------------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the latest checkpoint, if the run has one: weights, optimizer state,
        step, data position and schedule; with fault.recovery=memory, from the in-memory copies
        if they are at least as new."""
        restored = self._restore_from_memory() or self._restore()
        self.loaded_from = self.loaded_from or ("storage" if restored is not None else None)
        # A one-time switch: config.json, written next, keeps it false, so that a later resume
        # on yet other data is refused again.
        self.cfg.data.allow_change = False
        if restored is None:
            return False
        self.state.schedule_steps = schedule_horizon(self.cfg.train, restored.get("schedule_steps"))
        identity = restored.get("identity", {})
        same_data = "data" not in identity or (identity["data"] is not None
                                               and identity["data"]["sha256"] == self.identity["data"]["sha256"])
        if same_data and restored.get("loader") is not None:
            self.loader.load_state_dict(restored["loader"])
        # else other data, as data.allow_change asked (its position means nothing there), or an
        # imported model that has seen none: read it from the start
        return True

    def roll_back(self) -> dict | None:
        """Back to the latest checkpoint's weights and step (None: there is none yet), while the
        data goes on past the window that failed."""
        self.checkpointer.wait()
        position = self.loader.state_dict()
        restored = self._restore()
        if restored is not None:
            self.loader.load_state_dict(position)
            if self.memory is not None:  # copies of the abandoned steps must not be resumed from
                self.memory.discard_after(restored["step"])
        return restored

    def _restore_from_memory(self) -> dict | None:
        """fault.recovery=memory: load the newest in-memory state every rank can get back, if it
        is at least as new as the storage checkpoint; sets the step, training time and
        loaded_from, and returns its trainer state (None: storage is to be loaded)."""
        if self.memory is None:
            return None
        newest = checkpoint.committed(self.directory)
        storage_step = int(newest[-1].name.removeprefix("step_")) if newest else None
        folder = self.memory.store.folder
        restored = self.memory.restore(storage_step, self.parallel.parts, self.optimizers,
                                       lambda state: self.check_identity(folder, state))
        if restored is None:
            return None
        self.loaded_from = restored.loaded_from
        return self._restored(restored.trainer_state)

    def _restore(self) -> dict | None:
        """Load the latest checkpoint that verifies and matches this run; sets the step and
        training time it was saved at and returns its trainer state."""
        restored = checkpoint.restore(self.directory, self.parallel.parts, self.optimizers, report=self.report,
                                      group=self.checkpointer.group, check=self.check_identity)
        if restored is None:
            return None
        return self._restored(restored[1])

    def _restored(self, saved: dict) -> dict:
        self.state.step, self.state.train_time_s = saved["step"], saved.get("train_time_s", 0.0)
        return saved

    @cached_property
    def identity(self) -> dict:
        """The model shape, tokenizer and data a resume must match."""
        return identity(self.model_args, self.data)

    def check_identity(self, path: Path, state: dict) -> None:
        """Refuse to resume checkpoint `path` with another model, tokenizer or data than it was
        trained with (before any tensor is loaded). A checkpoint written before identities were
        saved has none: its tensors' shapes are still checked as it loads."""
        if "identity" not in state:
            return
        try:
            differences = identity_differences(state["identity"], self.identity, self.allow_data_change)
        except (KeyError, TypeError, AttributeError) as err:  # damaged like any unreadable file: an older one may do
            raise checkpoint.CheckpointError(f"its {checkpoint.STATE_FILE} holds a malformed identity "
                                             f"({type(err).__name__}: {err})") from None
        if differences:
            raise checkpoint.CheckpointMismatch(f"cannot resume {self.run_dir.path} from {path.name}: "
                                                + "; ".join(differences))

    def report(self, message: str) -> None:
        if self.is_main:
            print(f"gigatrain: {message}", file=sys.stderr, flush=True)
            self.event({"event": "checkpoint_report", "message": message})

    # -- cost (the time limit leaves room for the final checkpoint) --------------------------------
    def assumed_cost_s(self) -> float:
        """A checkpoint's cost until one is measured: this rank's weights and two AdamW moments
        at ASSUMED_WRITE_BYTES_PER_S, plus a second for DCP's planning and commit."""
        local = (p.to_local() if hasattr(p, "to_local") else p for p in self.parallel.parameters())
        return 1.0 + 3 * sum(p.numel() * p.element_size() for p in local) / ASSUMED_WRITE_BYTES_PER_S

    def on_checkpoint_event(self, record: dict) -> None:
        if record["event"] == "checkpoint":  # the first measurement replaces the assumption
            seen = self.cost_s if self.cost_measured else 0.0
            self.cost_s, self.cost_measured = max(seen, record["write_s"]), True
        self.event(record)


@dataclass
class LoadedRun:
    cfg: Config
    model: Transformer
    tokenizer: object
    step: int
    device: torch.device


def load_run(path: Path, device: torch.device) -> LoadedRun:
    """The latest checkpoint of a run, ready for evaluation or sampling (one process). It
    changes nothing in the run directory: a training run may be writing beside it."""
    run_dir = RunDir(path)
    args = run_dir.model_args()
    cfg = from_dict(run_dir.read_config())
    with torch.device(device):
        model = Transformer(args)
    restored = checkpoint.restore(run_dir.checkpoints, [model], report=_warn, repair=False)
    if restored is None:
        raise ConfigError(f"{path} has no checkpoint yet; train it first (gigatrain train --run.dir={path})")
    return LoadedRun(cfg=cfg, model=model, tokenizer=load_tokenizer(run_dir.tokenizer), step=restored[1]["step"],
                     device=device)


def _warn(message: str) -> None:
    print(f"gigatrain: warning: {message}", file=sys.stderr)

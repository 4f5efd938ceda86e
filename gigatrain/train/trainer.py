"""The training loop.

The data flow is the architecture:

    config -> layout + mesh -> data -> model -> parallelize -> optimizer -> loader
           -> [resume from checkpoint] -> loop(step, metrics, eval, stop?, checkpoint)
           -> final checkpoint, eval, samples, plots

The loop decides no interval itself: each concern is a component that owns its interval and
state, and can be tested alone — checkpoints (`CheckpointManager`, train/checkpointing.py),
evaluation and the end of the run (`Validator`, train/validation.py), the step records
(`MetricsProcessor`, metrics/processor.py), skipped updates, rollbacks and restarts
(`Recovery`, train/recovery.py), and when to stop (`Stopping`, `RunClock`, train/stopping.py).
Everything the loop needs to continue exactly where it stopped (weights, optimizer state,
step, data position, RNG) goes into each checkpoint. Around the loop stand the defences of
docs/fault-tolerance.md: a watchdog for hangs, a numerical guard that skips or rolls back bad
updates, signals that checkpoint and stop, background checkpoints, and the events
(events.jsonl) from which a run's goodput is measured.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gigatrain.config import Config, ConfigError, resolve_model_args, to_dict, to_toml
from gigatrain.data.loader import BatchLoader
from gigatrain.data.source import open_data_once
from gigatrain.fault.inject import FaultPlan
from gigatrain.fault.watchdog import Watchdog
from gigatrain.metrics.mfu import peak_flops
from gigatrain.metrics.processor import MetricsProcessor
from gigatrain.models.flops import param_counts, training_flops_per_token
from gigatrain.models.transformer import Transformer
from gigatrain.parallel import parallelize
from gigatrain.parallel.device import pick_device, pick_dtype
from gigatrain.parallel.float8 import check_float8
from gigatrain.parallel.mesh import init_distributed, parallel_dims
from gigatrain.ranks import global_rank, is_main_process
from gigatrain.rundir import RunDir, RunDirLock
from gigatrain.train.balancing import ExpertBalance
from gigatrain.train.checkpointing import CheckpointManager, TrainState
from gigatrain.train.optim import build_optimizer, set_learning_rate
from gigatrain.train.recovery import Recovery, StartPhases
from gigatrain.train.replica import ReplicaGroup, lighthouse_address
from gigatrain.train.schedule import lr_at, schedule_horizon
from gigatrain.train.stopping import PREEMPTION_SIGNALS, RunClock, Stopping, StopSignal
from gigatrain.train.validation import Validator


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_by: str  # max_steps | stop_at_step | time_limit | SIGINT | SIGTERM | SIGUSR1
    final_loss: float
    val_loss: float | None
    val_bpb: float | None


def lock_run_dir_once(run_dir: RunDir) -> RunDirLock | None:
    """The job's lock on its run directory. Under torchrun rank 0 holds it for the whole job
    (a restart starts a fresh rank 0, whose predecessor's lock died with it); if another
    trainer holds it, every rank stops with rank 0's message rather than waiting for it."""
    if not torch.distributed.is_initialized():
        return run_dir.lock()
    lock, refusal = None, [None]
    if is_main_process():
        try:
            lock = run_dir.lock()
        except ConfigError as err:
            refusal = [str(err)]
    torch.distributed.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise ConfigError(refusal[0])
    return lock


class Trainer:
    def __init__(self, cfg: Config, started_at: float | None = None):
        """`started_at`: when the command started (default now); train.time_limit_s counts from it."""
        self.cfg = cfg
        t = cfg.train
        self.clock = RunClock(started_at or time.time(), t.time_limit_s)
        self.phases = StartPhases(self.clock.started_at)  # where this process's start goes (Recovery records it)
        self.run_dir = RunDir(cfg.run_dir)
        # The layout is checked before any process group, data or model exists.
        self.dims = parallel_dims(cfg, resolve_model_args(cfg))
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.dtype, self.device)
        check_float8(t, self.device, self.dims.tp)
        self.lighthouse = lighthouse_address(cfg.fault) if cfg.fault.recovery == "replica" else None
        self.owns_process_group = init_distributed(self.device, cfg.fault.startup_timeout_s, cfg.run_dir)
        self.is_main = is_main_process()
        # One trainer per run directory, settled before anything in it is read or written.
        self.lock = lock_run_dir_once(self.run_dir)
        try:
            self._build(cfg)
        except BaseException:
            self.release_run_dir()
            raise

    def _build(self, cfg: Config) -> None:
        t = cfg.train
        self.mesh = self.dims.build_meshes(self.device.type) if self.dims.world_size > 1 else None
        self.phases.reached("rendezvous")
        self.faults = FaultPlan.from_env(cfg.run_dir, global_rank(), self.dims.world_size)
        records = self.run_dir if self.is_main else None  # rank 0 records the run
        self.recovery = Recovery(cfg.fault, records, self.phases)

        self.data = open_data_once(cfg)
        self.seq_len = cfg.data.seq_len
        self.model_args = resolve_model_args(cfg, vocab_size=self.data.vocab_size)
        # Several processes build the model on the meta device: nothing is allocated until
        # it is sharded, and then each rank draws exactly its shard of one process's weights
        # (on its device, as one process does: a GPU's random streams differ from a CPU's).
        with torch.device("meta" if self.mesh is not None else self.device):
            model = Transformer(self.model_args, seed=t.seed)
        self.parallel = parallelize(model, self.dims, self.mesh, cfg, self.device, self.dtype)
        self.optimizers = [build_optimizer(part, t, self.device) for part in self.parallel.parts]
        self.balance = ExpertBalance(self.parallel) if self.model_args.is_moe else None
        self.moe_record: dict = {}  # the last step's router statistics (MoE runs)
        # Replica groups read as data-parallel ranks of the whole: group i's ranks come after
        # the ranks of groups 0..i-1, and each group trains on its train.batch_size sequences.
        groups, group = (cfg.fault.replica_groups, cfg.fault.replica_id) if self.lighthouse else (1, 0)
        self.loader = BatchLoader(self.data.split("train"), self.seq_len, self.dims.global_batch * groups, seed=t.seed,
                                  rank=group * self.dims.dp + self.parallel.dp_rank, world_size=groups * self.dims.dp)

        self.tokens_per_step = self.dims.global_batch * self.seq_len
        self.flops_per_token = training_flops_per_token(self.model_args, self.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.metrics = MetricsProcessor(records, tokens_per_step=self.tokens_per_step,
                                        flops_per_token=self.flops_per_token, peak_flops=self.peak_flops,
                                        world_size=self.dims.world_size, device=self.device)
        self.state = TrainState(schedule_steps=schedule_horizon(t, None))
        self.checkpoints = CheckpointManager(cfg, self.run_dir, self.parallel, self.optimizers, self.loader, self.state,
                                             model_args=self.model_args, data=self.data, layout=self.dims.degrees(),
                                             tokens_per_step=self.tokens_per_step, faults=self.faults,
                                             event=self.metrics.event, is_main=self.is_main)
        self.validator = Validator(cfg, self.data, self.parallel, dims=self.dims, device=self.device, dtype=self.dtype,
                                   clock=self.clock, run_dir=self.run_dir)
        self.replica = None if self.lighthouse is None else ReplicaGroup(
            cfg, self.lighthouse, group_rank=global_rank(), group_size=self.dims.world_size, parallel=self.parallel,
            optimizers=self.optimizers, loader=self.loader, state=self.state, guard=self.recovery.guard,
            checkpoints=self.checkpoints, metrics=self.metrics, started_at=self.clock.started_at)
        self.phases.reached("build")

    @property
    def model(self) -> torch.nn.Module:
        """The whole model, where one process holds it (every layout but pipelines)."""
        if self.dims.pp > 1:
            raise AttributeError("a pipeline-parallel rank holds stages, not the whole model; use trainer.parallel.parts")
        return self.parallel.parts[0]

    # -- one optimizer step ---------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> tuple[float, float, str | None]:
        """One step on this rank's share of the global batch; returns the global mean loss, the
        gradient norm (the same on every rank) and why the update was skipped (None: applied;
        "uncommitted": a replica group failed during the step, see `ReplicaGroup.should_commit`)."""
        for optimizer in self.optimizers:
            set_learning_rate(optimizer, lr)
        local_loss = self.parallel.forward_backward(inputs, targets)
        if self.faults and self.faults.after_backward(self.state.step + 1, self._local_gradients()):
            local_loss = local_loss * float("nan")
        loss = self.parallel.reduce_sum(local_loss / (self.dims.dp * self.dims.cp))
        if self.replica is not None:
            loss = self.replica.average(loss)  # and the gradients, over the replica groups in the step
            if not self.replica.should_commit():
                for optimizer in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                return float("nan"), float("nan"), "uncommitted"
        grad_norm = self.parallel.clip_grad_norm(self.cfg.train.grad_clip or float("inf"))
        # The step's one wait for the GPU: the guard must see the loss and gradient norm before
        # the optimizer applies the update (a NaN applied poisons the weights and AdamW's
        # moments for good), so both are read here, in one transfer rather than one each.
        loss, grad_norm = torch.stack([loss.float(), grad_norm.float()]).tolist()
        # Both values are global, so every rank takes the same decision.
        skipped = self.recovery.guard.check(loss, grad_norm)
        for optimizer in self.optimizers:
            if skipped is None:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.balance is not None:
            self.moe_record = self.balance.after_step(applied=skipped is None)
        return loss, grad_norm, skipped

    def _local_gradients(self):
        """This rank's own gradient shards, which a fault may poison."""
        return (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                for p in self.parallel.parameters() if p.grad is not None)

    def _next_step(self, watchdog: Watchdog) -> tuple[float, float, bool]:
        """The next optimizer step, recorded; returns its loss and seconds, and whether the
        step did not advance the run: the guard rolled it back to its last checkpoint, or a
        replica group failed during it (the step is tried again)."""
        started = time.perf_counter()
        # The replica groups' quorum; a group that is behind loads a healthy one's live state here.
        replicas = {"replicas": self.replica.start_step()} if self.replica is not None else {}
        if self.replica is not None:
            self.recovery.state_received(self.state.step, self.checkpoints.loaded_from)
        self.faults.before_step(self.state.step + 1)
        inputs, targets = self.loader.next_batch()
        lr = lr_at(self.state.step + 1, self.cfg.train, self.state.schedule_steps)
        loss, grad_norm, skipped = self.train_step(inputs, targets, lr)
        seconds = time.perf_counter() - started
        if skipped == "uncommitted":
            watchdog.beat()
            self.metrics.event({"event": "uncommitted", "step": self.state.step + 1, "seconds": seconds})
            self.metrics.message(f"step {self.state.step + 1}: a replica group failed during the step; "
                                 f"its update is dropped and the step tried again")
            return loss, seconds, True
        self.state.step += 1
        self.state.train_time_s += seconds
        watchdog.beat()
        self.metrics.log_step(self.state.step, loss, lr, grad_norm, seconds, skipped, extra={**self.moe_record, **replicas})
        rolled_back = bool(skipped) and self.recovery.on_skipped_update(skipped, self.state.step, loss, grad_norm,
                                                                        self.checkpoints, self.metrics)
        return loss, seconds, rolled_back

    # -- the loop -----------------------------------------------------------------------
    def run(self, stop: StopSignal | None = None) -> TrainResult:
        """Train to the end. `train()` passes a `stop` that it holds until the trainer has closed
        (see StopSignal); without one, the run holds its own while it trains."""
        if stop is None:
            with StopSignal() as own:
                return self.run(own)
        # Watched from here on: a rank stuck loading the checkpoint is a hang like any other.
        watchdog = Watchdog(self.cfg.fault.watchdog_s, self.run_dir.path, global_rank(), first="loading the checkpoint")
        try:
            return self._run(watchdog, Stopping(self.cfg.train.stop_at_step, stop, self.clock, self.mesh, self.device))
        finally:
            watchdog.stop()

    def _run(self, watchdog: Watchdog, stopping: Stopping) -> TrainResult:
        t = self.cfg.train
        resumed = self.checkpoints.resume()
        watchdog.beat("the first step", startup=True)
        if self.replica is not None:
            self.replica.start()
        start_step = self.state.step
        self.recovery.begin(start_step, self.metrics, loaded_from=self.checkpoints.loaded_from)
        self._record_start(resumed)
        if t.time_limit_s:
            self.validator.measure_end_costs()
        self.clock.end_startup()
        stopped_by, loss, val, cut = "max_steps", float("nan"), (None, None), None
        try:
            while self.state.step < t.max_steps:
                loss, seconds, repeat = self._next_step(watchdog)
                self.recovery.after_step(seconds, self.metrics)
                if repeat:
                    watchdog.beat("a step after the rollback")
                    continue  # back at a checkpointed step (or no step done): nothing to evaluate or save
                step = self.state.step
                if self.validator.due(step):
                    val = self.validator.validate(step, self.metrics)
                    watchdog.beat()
                stopped_by = stopping.after_step(step, start_step, seconds + self.validator.cost_at_s(step + 1),
                                                 self.checkpoints.cost_s + self.validator.end_cost_s()) or "max_steps"
                if stopped_by != "max_steps" or step >= t.max_steps:
                    break
                if self.checkpoints.due(step):
                    self.clock.spent["checkpoints"] += self.checkpoints.save()
                    watchdog.beat()
            self.recovery.write_start(self.metrics)  # a process that did a single step
            self.metrics.close_display()
            if stopped_by in PREEMPTION_SIGNALS:
                self.metrics.message(f"{stopped_by}: saving a checkpoint at step {self.state.step}, then exiting for a requeue")
            watchdog.beat("the final checkpoint")
            with self.clock.timed("checkpoints"):
                self.checkpoints.finish(trained=self.state.step > start_step or not resumed)
            # The run is finished once its final checkpoint is committed; a signal before that stops it as documented.
            stopped_by = stopping.agree(stopping.signal.received) or stopped_by
            if stopped_by in ("max_steps", "time_limit"):
                watchdog.beat("the final evaluation")
                cut = stopping.end_cut()
                val = self.validator.finish(self.state.step, cut, self.metrics)
        finally:
            self.checkpoints.close()
            if self.replica is not None:
                self.replica.close()
        return self._record_end(stopping, stopped_by, loss, val, cut.by if cut is not None else None)

    def _record_start(self, resumed: bool) -> None:
        """The run's files (rank 0), its metrics opened at this step, the start event and the banner."""
        cfg, t, step = self.cfg, self.cfg.train, self.state.step
        if self.is_main:
            self.data.tokenizer.save(self.run_dir.path)
            self.run_dir.write_config(to_dict(cfg), to_toml(cfg))
            self.run_dir.write_run_info(self.run_info())
        self.metrics.start(step, t.progress, t.max_steps)
        self.metrics.event({"event": "start", "step": step, "resumed": resumed, "world_size": self.dims.world_size,
                            "process_start": self.clock.started_at, "schedule_steps": self.state.schedule_steps})
        counts = param_counts(self.model_args)
        self.metrics.message(f"run {self.run_dir.path}  model {cfg.model.preset} ({counts.total / 1e6:.2f}M params)  "
                             f"device {self.device}  {self.tokens_per_step:,} tokens/step"
                             + (f"  {self.dims.world_size} processes: "
                                + " x ".join(f"{k}={v}" for k, v in self.dims.degrees().items())
                                if self.dims.world_size > 1 else "")
                             + (f"  resumed at step {step}" if resumed else ""))
        if step >= t.max_steps:
            self.metrics.message(f"the run is already at train.max_steps={t.max_steps}; raise it to train on "
                                 f"(e.g. --train.max_steps={2 * t.max_steps})")

    def _record_end(self, stopping: Stopping, stopped_by: str, loss: float, val: tuple, cut_by: str | None) -> TrainResult:
        """Plots (unless a signal or the time limit has cut the end short: `gigatrain report RUN`
        draws them later), the stop event with where the time went, and the last line."""
        self.metrics.close_metrics()
        if self.is_main and not (cut_by or stopping.signal.received or self.clock.late()):
            with self.clock.timed("samples_plots"):
                # matplotlib is imported here, at the end: it would delay every start and restart.
                from gigatrain.metrics.plots import plot_run

                plot_run(self.run_dir)
        spent = self.clock.time_spent()
        self.metrics.event({"event": "stop", "step": self.state.step, "reason": stopped_by, "cut_short_by": cut_by,
                            "time_spent": spent})
        self.metrics.close_events()
        message = f"stopped by {stopped_by} at step {self.state.step}"
        if val[0] is not None:
            message += f"; val loss {val[0]:.4f}, {val[1]:.4f} bits/byte"
        if cut_by:
            message += f"; {cut_by} cut the end short"
        message += "; time " + ", ".join(f"{name.replace('_', '/')} {s:.1f} s" for name, s in spent.items())
        self.metrics.message(message + f"; run directory {self.run_dir.path}")
        return TrainResult(self.run_dir.path, self.state.step, stopped_by, loss, *val)

    def close(self, clean: bool = True) -> None:
        if self.owns_process_group:
            if clean:
                # Ranks leave together: one that tears its group down while rank 0 still
                # writes plots can abort inside gloo. (After an error, peers may never come.)
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        self.release_run_dir()

    def release_run_dir(self) -> None:
        """Let the next trainer have the run directory (ending the process does the same)."""
        if self.lock is not None:
            self.lock.release()

    def run_info(self) -> dict:
        return {
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "world_size": self.dims.world_size,
            "layout": self.dims.to_dict(),
            "model_args": asdict(self.model_args),
            "n_params": param_counts(self.model_args).total,
            "seq_len": self.seq_len,
            "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "data": str(self.data.path),
        }


def train(cfg: Config, started_at: float | None = None) -> TrainResult:
    group_before = torch.distributed.is_initialized()
    try:
        trainer = Trainer(cfg, started_at)
    except BaseException:
        # E.g. bad data found after the process group exists: leave it cleanly, so the
        # process ends with its error line and exit code rather than an abort in gloo.
        if torch.distributed.is_initialized() and not group_before:
            torch.distributed.destroy_process_group()
        raise
    # From the first step until the trainer has closed: see StopSignal.
    with StopSignal() as stop:
        try:
            result = trainer.run(stop)
        except BaseException:
            trainer.close(clean=False)
            raise
        trainer.close()
    return result

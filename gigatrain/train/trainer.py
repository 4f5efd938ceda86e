"""The training loop.

The data flow is the architecture:

    config -> data -> model -> parallelize -> optimizer -> loader
           -> [resume from checkpoint] -> loop(step, eval, checkpoint, metrics) -> final checkpoint, eval, plots, samples

Everything the loop needs to continue exactly where it stopped (weights,
optimizer state, step, data position, RNG) goes into each checkpoint. Around the loop stand
the defences of docs/fault-tolerance.md: a watchdog for hangs, a numerical guard that skips
or rolls back bad updates, signals that checkpoint and stop, background checkpoints, and the
events (events.jsonl) from which a run's goodput is measured.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.config import Config, ConfigError, apply_overrides, from_dict, load_config, resolve_model_args
from gigatrain.data import DataError
from gigatrain.data.loader import BatchLoader, TokenData, eval_batches
from gigatrain.data.prepare import ensure_default_data
from gigatrain.fault.goodput import EVENTS_FILE
from gigatrain.fault.guard import NumericalGuard, TrainingDiverged
from gigatrain.fault.inject import FaultPlan
from gigatrain.fault.watchdog import Watchdog
from gigatrain.metrics.logger import MetricsFile, ProgressDisplay, read_metrics
from gigatrain.metrics.mfu import peak_flops
from gigatrain.metrics.plots import plot_run
from gigatrain.models.flops import param_counts, training_flops_per_token
from gigatrain.models.transformer import Transformer
from gigatrain.parallel import parallelize
from gigatrain.parallel.mesh import AXES, global_rank, init_distributed, is_main_process, parallel_dims
from gigatrain.paths import cache_dir
from gigatrain.train import rundir
from gigatrain.train.evaluate import sample_text
from gigatrain.train.optim import build_optimizer
from gigatrain.train.schedule import lr_at

# No trailing space: BPE merges a space into the next word, so "def " would end on a lone space.
DEFAULT_CORPUS_PROMPTS = ["def", "class", "import"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_by: str  # max_steps | stop_at_step | time_limit | SIGINT | SIGTERM | SIGUSR1
    final_loss: float
    val_loss: float | None
    val_bpb: float | None


# Why a run stopped; the index is what ranks agree on (the highest wins).
STOP_REASONS = [None, "stop_at_step", "time_limit", "SIGTERM", "SIGUSR1", "SIGINT"]
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")  # SIGUSR1: Slurm's warning before the time limit
IGNORE = -100  # cross_entropy's ignore_index: padding targets that count for nothing


def pick_device(name: str) -> torch.device:
    """The device of this process: under torchrun, GPU LOCAL_RANK of the node."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use train.device=cpu or auto")
    if name == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. bf16 on GPU by default; CPUs train in fp32,
    where bf16 is slower on most cores and the precision is not worth losing."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bfloat16" else None


def open_data(cfg: Config) -> TokenData:
    if cfg.data.path:
        return TokenData(Path(cfg.data.path), verify=cfg.data.verify)
    folder = ensure_default_data(cache_dir() / "data", tokenizer=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size)
    return TokenData(folder, verify=cfg.data.verify)


def open_data_once(cfg: Config) -> TokenData:
    """Rank 0 opens (and on first use prepares) the data before the others, so that ranks
    do not race to prepare the same default corpus; if the data is bad, every rank stops
    with rank 0's message rather than waiting for it."""
    if not torch.distributed.is_initialized():
        return open_data(cfg)
    data, outcome = None, [None]
    if is_main_process():
        try:
            data = open_data(cfg)
        except (DataError, ConfigError) as err:
            outcome = [(type(err) is DataError, str(err))]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        is_data_error, message = outcome[0]
        raise (DataError if is_data_error else ConfigError)(message)
    return data if data is not None else open_data(cfg)


def pad_batch(inputs: torch.Tensor, targets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill a short last evaluation batch up to `rows` with targets that count for nothing,
    so every rank of every layout runs the same shapes."""
    missing = rows - inputs.shape[0]
    if missing <= 0:
        return inputs, targets
    return (torch.cat([inputs, inputs[:1].expand(missing, -1)]),
            torch.cat([targets, torch.full((missing, targets.shape[1]), IGNORE, dtype=targets.dtype)]))


class StopSignal:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag the loop checks after each step, so the step in
    flight finishes and a checkpoint is written before exiting."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        self.run_dir = cfg.run_dir
        # The layout is checked before any process group, data or model exists.
        self.dims = parallel_dims(cfg, resolve_model_args(cfg))
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.dtype, self.device)
        self.started_at = time.time()
        self.owns_process_group = init_distributed(self.device, cfg.fault.startup_timeout_s, self.run_dir)
        self.mesh = self.dims.build_meshes(self.device.type) if self.dims.world_size > 1 else None
        self.is_main = is_main_process()
        self.faults = FaultPlan.from_env(self.run_dir, global_rank(), self.dims.world_size)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # What earlier processes of this run left, read before this one writes anything.
        self.history = ((read_metrics(self.run_dir / rundir.METRICS_FILE), read_metrics(self.run_dir / EVENTS_FILE))
                        if self.is_main else ([], []))
        self.events = MetricsFile(self.run_dir / EVENTS_FILE if self.is_main else None)

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
        self.loader = BatchLoader(self.data.split("train"), self.seq_len, t.batch_size, seed=t.seed,
                                  rank=self.parallel.dp_rank, world_size=self.dims.dp)

        self.tokens_per_step = t.batch_size * self.seq_len
        self.flops_per_token = training_flops_per_token(self.model_args, self.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.step = 0
        self.train_time_s = 0.0
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.checkpointer = checkpoint.Checkpointer(self.checkpoint_dir, t.keep_checkpoints, t.async_checkpoint,
                                                    faults=self.faults, on_event=self.event)
        self.guard = NumericalGuard(cfg.fault)

    @property
    def model(self) -> torch.nn.Module:
        """The whole model, where one process holds it (every layout but pipelines)."""
        if self.dims.pp > 1:
            raise AttributeError("a pipeline-parallel rank holds stages, not the whole model; use trainer.parallel.parts")
        return self.parallel.parts[0]

    # -- one optimizer step ---------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> tuple[float, float, str | None]:
        """One step on this rank's share of the global batch; returns the global mean loss, the
        gradient norm (the same on every rank) and why the update was skipped (None: applied)."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        local_loss = self.parallel.forward_backward(inputs, targets)
        if self.faults and self.faults.after_backward(self.step + 1, self._local_gradients()):
            local_loss = local_loss * float("nan")
        grad_norm = self.parallel.clip_grad_norm(self.cfg.train.grad_clip or float("inf")).item()
        loss = self.parallel.reduce_sum(local_loss / (self.dims.dp * self.dims.cp)).item()
        # Both values are global, so every rank takes the same decision.
        skipped = self.guard.check(loss, grad_norm)
        for optimizer in self.optimizers:
            if skipped is None:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, skipped

    def _local_gradients(self):
        """This rank's own gradient shards, which a fault may poison."""
        return (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                for p in self.parallel.parameters() if p.grad is not None)

    # -- state --------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "loader": self.loader.state_dict(), "train_time_s": self.train_time_s,
                "tokens_seen": self.step * self.tokens_per_step, "layout": self.layout()}

    def layout(self) -> dict:
        return {axis: getattr(self.dims, axis) for axis in AXES}

    def save_checkpoint(self) -> float:
        """Start a checkpoint of the current step (in the background unless
        train.async_checkpoint=false); returns the seconds training stalled for it."""
        return self.checkpointer.save(self.step, self.parallel.parts, self.optimizers, self.trainer_state())

    def final_checkpoint(self) -> None:
        """A checkpoint the process must not exit without: save and wait for the commit."""
        started = time.perf_counter()
        self.save_checkpoint()
        if not self.checkpointer.wait():
            raise checkpoint.CheckpointWriteError(
                f"the checkpoint at step {self.step} could not be written (see the warning above); "
                f"the run can resume from the previous one once the storage is fixed")
        if self.checkpointer.async_save:
            self.event({"event": "final_checkpoint_wait", "step": self.step, "wait_s": time.perf_counter() - started})

    def resume(self) -> bool:
        restored = checkpoint.restore(self.checkpoint_dir, self.parallel.parts, self.optimizers,
                                      report=self.report, group=self.checkpointer.group)
        if restored is None:
            return False
        state = restored[1]
        self.step = state["step"]
        self.train_time_s = state.get("train_time_s", 0.0)
        self.loader.load_state_dict(state["loader"])
        return True

    def event(self, record: dict) -> None:
        """One line of events.jsonl (rank 0): restarts, checkpoints, faults. Never truncated."""
        self.events.write({**record, "time": time.time()})

    def report(self, message: str) -> None:
        if self.is_main:
            print(f"gigatrain: {message}", file=sys.stderr, flush=True)
            self.event({"event": "checkpoint_report", "message": message})

    def evaluate(self) -> tuple[float, float]:
        """Mean loss over the first eval_batches global batches of the val split (the same
        windows under every layout), and bits per byte."""
        split = self.data.split("val")
        batch, local = self.cfg.train.batch_size, self.loader.local_batch
        mine = slice(self.parallel.dp_rank * local, (self.parallel.dp_rank + 1) * local)
        loss_sum, count = torch.zeros((), device=self.device), 0
        self.parallel.train(False)
        for inputs, targets in eval_batches(split, self.seq_len, batch, self.cfg.train.eval_batches):
            inputs, targets = pad_batch(inputs, targets, batch)
            loss_sum += self.parallel.loss_sum(inputs[mine], targets[mine]).float()
            count += int((targets != IGNORE).sum())
        self.parallel.train(True)
        loss = self.parallel.reduce_sum(loss_sum).item() / max(1, count)
        # The evaluated windows are a sample of the split: convert with the split's bytes per token.
        return loss, loss / (math.log(2) * split.bytes_per_token)

    def write_samples(self) -> None:
        t = self.cfg.train
        if not t.samples or self.dims.world_size > 1:
            return  # sampling runs the whole model in one process: `gigatrain generate RUN` after training
        tokenizer = self.data.tokenizer
        prompts = DEFAULT_CORPUS_PROMPTS if not self.cfg.data.path else [""]
        generator = torch.Generator().manual_seed(t.seed)
        lines = []
        for i in range(t.samples):
            prompt = prompts[i % len(prompts)]
            text = sample_text(self.model, tokenizer, prompt, t.sample_tokens, temperature=0.8, top_k=50,
                               context_len=self.seq_len, device=self.device, dtype=self.dtype, generator=generator)
            lines.append(f"--- sample {i + 1} (step {self.step}, prompt {prompt!r}) ---\n{text}\n")
        (self.run_dir / "samples.txt").write_text("\n".join(lines))

    def should_stop(self, stop: StopSignal, started: float, last_step_time: float, start_step: int) -> str | None:
        """Why to stop after this step, agreed by every rank: a signal or the clock may reach
        one rank a step before another, and ranks that stop apart hang in a collective."""
        t = self.cfg.train
        reason = None
        if stop.received:
            reason = stop.received
        elif t.stop_at_step and self.step == t.stop_at_step and self.step > start_step:
            reason = "stop_at_step"
        elif t.time_limit_s and time.perf_counter() - started + last_step_time > t.time_limit_s:
            reason = "time_limit"
        if self.mesh is None:
            return reason
        code = torch.tensor([STOP_REASONS.index(reason)], device=self.device)
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        return STOP_REASONS[int(code.item())]

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> TrainResult:
        # Watched from here on: a rank stuck loading the checkpoint is a hang like any other.
        watchdog = Watchdog(self.cfg.fault.watchdog_s, self.run_dir, global_rank(), first="loading the checkpoint")
        try:
            return self._run(watchdog)
        finally:
            watchdog.stop()

    def _run(self, watchdog: Watchdog) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        resumed = self.resume()
        watchdog.beat("the first step", startup=True)
        start_step = self.step
        metrics_path = self.run_dir / rundir.METRICS_FILE
        restart = self.previous_segment() if self.is_main else None
        if self.is_main:
            self.data.tokenizer.save(self.run_dir)
            rundir.write_run_files(self.run_dir, cfg, self.run_info())
        metrics = MetricsFile(metrics_path if self.is_main else None)
        metrics.truncate_after(self.step)
        self.event({"event": "start", "step": self.step, "resumed": resumed, "world_size": self.dims.world_size,
                    "process_start": self.started_at})
        display = ProgressDisplay(t.progress if self.is_main else "off", t.max_steps, self.step)
        counts = param_counts(self.model_args)
        display.message(f"run {self.run_dir}  model {cfg.model.preset} ({counts.total / 1e6:.2f}M params)  "
                        f"device {self.device}  {self.tokens_per_step:,} tokens/step"
                        + (f"  {self.dims.world_size} processes: " + " x ".join(f"{k}={v}" for k, v in self.layout().items())
                           if self.dims.world_size > 1 else "")
                        + (f"  resumed at step {self.step}" if resumed else ""))
        if self.step >= t.max_steps:
            display.message(f"the run is already at train.max_steps={t.max_steps}; raise it to train on "
                            f"(e.g. --train.max_steps={2 * t.max_steps})")

        stopped_by, loss, val = "max_steps", float("nan"), (None, None)
        started = time.perf_counter()
        last_step_time = 0.0
        try:
            with StopSignal() as stop:
                while self.step < t.max_steps:
                    if restart is not None:  # the first step of a resumed process: the restart is over
                        previous_end = restart.pop("previous_end")
                        self.event({**restart, "restart_s": time.time() - previous_end})
                        restart = None
                    step_start = time.perf_counter()
                    self.faults.before_step(self.step + 1)
                    inputs, targets = self.loader.next_batch()
                    lr = lr_at(self.step + 1, t)
                    loss, grad_norm, skipped = self.train_step(inputs, targets, lr)
                    self.step += 1
                    last_step_time = time.perf_counter() - step_start
                    self.train_time_s += last_step_time
                    watchdog.beat()
                    tokens_per_s = self.tokens_per_step / last_step_time  # the whole job's
                    record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_s,
                              "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.dims.world_size),
                              "step_time_s": last_step_time, "tokens": self.step * self.tokens_per_step,
                              "peak_memory_gb": peak_memory_gb(self.device), "time": time.time()}
                    if skipped:
                        record["skipped"] = skipped
                    metrics.write(record)
                    display.step(record)
                    if skipped and self.on_skipped_update(skipped, loss, grad_norm, metrics, display):
                        watchdog.beat("a step after the rollback")
                        continue  # back at a checkpointed step: nothing to evaluate or save

                    at_end = self.step >= t.max_steps
                    if self.step % t.eval_every == 0 and not at_end:
                        val = self.evaluate()
                        metrics.write({"step": self.step, "val_loss": val[0], "val_bpb": val[1]})
                        display.message(f"step {self.step}: val loss {val[0]:.4f}, {val[1]:.4f} bits/byte")
                        watchdog.beat()
                    stopped_by = self.should_stop(stop, started, last_step_time, start_step) or "max_steps"
                    if stopped_by != "max_steps" or at_end:
                        break
                    if self.step % t.checkpoint_every == 0:
                        self.save_checkpoint()
                        watchdog.beat()

                display.close()
                if stopped_by in PREEMPTION_SIGNALS:
                    display.message(f"{stopped_by}: saving a checkpoint at step {self.step}, then exiting for a requeue")
                watchdog.beat("the final checkpoint")
                if self.step > start_step or not resumed:
                    self.final_checkpoint()
                else:
                    self.checkpointer.wait()
                if stopped_by in ("max_steps", "time_limit"):
                    watchdog.beat("the final evaluation")
                    val = self.evaluate()
                    metrics.write({"step": self.step, "val_loss": val[0], "val_bpb": val[1]})
                    if self.is_main:
                        self.write_samples()
        finally:
            self.checkpointer.close()
        self.event({"event": "stop", "step": self.step, "reason": stopped_by})
        metrics.close()
        self.events.close()
        if self.is_main:
            plot_run(self.run_dir)
        message = f"stopped by {stopped_by} at step {self.step}"
        if val[0] is not None:
            message += f"; val loss {val[0]:.4f}, {val[1]:.4f} bits/byte"
        display.message(message + f"; run directory {self.run_dir}")
        return TrainResult(self.run_dir, self.step, stopped_by, loss, *val)

    def on_skipped_update(self, reason: str, loss: float, grad_norm: float, metrics: MetricsFile,
                          display: ProgressDisplay) -> bool:
        """The guard skipped this step's update; after rollback_after in a row, roll back to the
        last checkpoint and carry on past the data that caused them. Returns whether it rolled back."""
        f = self.cfg.fault
        self.event({"event": "skip", "step": self.step, "reason": reason, "loss": loss, "grad_norm": grad_norm,
                    "recent_mean": self.guard.mean()})
        display.message(f"step {self.step}: {'NaN/Inf loss or gradient' if reason == 'nan' else 'loss spike'} "
                        f"(loss {loss:.4g}, grad norm {grad_norm:.4g}); update skipped")
        if not self.guard.wants_rollback:
            return False
        if self.guard.rollbacks >= f.max_rollbacks:
            self.event({"event": "diverged", "step": self.step, "rollbacks": self.guard.rollbacks})
            raise TrainingDiverged(
                f"training keeps failing numerically: {f.rollback_after} skipped updates in a row at step {self.step} "
                f"after {self.guard.rollbacks} rollback(s) (fault.max_rollbacks={f.max_rollbacks}); lower train.lr, "
                f"check the data after the last checkpoint, or raise fault.max_rollbacks; "
                f"the last good checkpoint is in {self.checkpoint_dir}")
        self.checkpointer.wait()
        from_step, position = self.step, self.loader.state_dict()
        restored = checkpoint.restore(self.checkpoint_dir, self.parallel.parts, self.optimizers,
                                      report=self.report, group=self.checkpointer.group)
        if restored is None:
            raise TrainingDiverged(f"training failed numerically {f.rollback_after} times in a row at step {self.step} "
                                   f"before any checkpoint was written; lower train.lr or check the data")
        state = restored[1]
        lost = [r for r in read_metrics(metrics.path) if "loss" in r and r["step"] > state["step"]] if metrics.path else []
        self.step, self.train_time_s = state["step"], state.get("train_time_s", 0.0)
        self.loader.load_state_dict(position)  # the weights go back; the data goes on past the bad window
        metrics.truncate_after(self.step)
        self.guard.rolled_back()
        self.event({"event": "rollback", "step": self.step, "from_step": from_step, "recomputed_steps": len(lost),
                    "recomputed_s": sum(r["step_time_s"] for r in lost), "rollbacks": self.guard.rollbacks})
        display.message(f"rolled back from step {from_step} to the checkpoint at step {self.step}; the data "
                        f"goes on past the window that failed (rollback {self.guard.rollbacks} of at most {f.max_rollbacks})")
        return True

    def previous_segment(self) -> dict | None:
        """If this process continues a run that an earlier one started, what the interruption
        cost: the steps it did after the checkpoint we resumed from (to be done again), and
        when it was last seen alive (restart time is measured up to our first step)."""
        records, events = self.history
        if not records and not events:
            return None
        lost = [r for r in records if "loss" in r and r["step"] > self.step]
        last_seen = max([r.get("time", 0) for r in records] + [e.get("time", 0) for e in events])
        stop = events[-1] if events and events[-1].get("event") == "stop" else None
        if stop is not None and stop.get("reason") not in PREEMPTION_SIGNALS:
            # It had finished (max_steps, stop_at_step, time limit, Ctrl-C): continuing it later
            # is new work, not a restart, and the time in between is no one's loss.
            self.event({"event": "continue", "step": self.step, "idle_s": self.started_at - last_seen})
            return None
        return {"event": "restart", "step": self.step, "after": "preemption" if stop else "failure",
                "recomputed_steps": len(lost), "recomputed_s": sum(r["step_time_s"] for r in lost),
                "previous_end": last_seen}

    def close(self, clean: bool = True) -> None:
        if self.owns_process_group:
            if clean:
                # Ranks leave together: one that tears its group down while rank 0 still
                # writes plots can abort inside gloo. (After an error, peers may never come.)
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def run_info(self) -> dict:
        return {
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "world_size": self.dims.world_size,
            "layout": self.layout(),
            "model_args": rundir.model_args_dict(self.model_args),
            "n_params": param_counts(self.model_args).total,
            "seq_len": self.seq_len,
            "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "data": str(self.data.path),
        }

def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)


def resolve_run_config(config_path: str | None, overrides: list[str]) -> Config:
    """A new run: defaults, the TOML file, the overrides. An existing run directory: its saved
    config plus the overrides, so `gigatrain train --run.dir=D` continues run D as it was."""
    cfg = load_config(config_path, overrides)
    saved = rundir.saved_config(cfg.run_dir)
    if saved is None or config_path is not None:
        return cfg
    resumed = from_dict(saved)
    apply_overrides(resumed, overrides)
    return resumed


def train(cfg: Config) -> TrainResult:
    group_before = torch.distributed.is_initialized()
    try:
        trainer = Trainer(cfg)
    except BaseException:
        # E.g. bad data found after the process group exists: leave it cleanly, so the
        # process ends with its error line and exit code rather than an abort in gloo.
        if torch.distributed.is_initialized() and not group_before:
            torch.distributed.destroy_process_group()
        raise
    try:
        result = trainer.run()
    except BaseException:
        trainer.close(clean=False)
        raise
    trainer.close()
    return result

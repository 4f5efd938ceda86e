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
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
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
from gigatrain.train.evaluate import generate, sample_text
from gigatrain.train.optim import build_optimizer
from gigatrain.train.schedule import lr_at, schedule_horizon

# No trailing space: BPE merges a space into the next word, so "def " would end on a lone space.
DEFAULT_CORPUS_PROMPTS = ["def", "class", "import"]


@dataclass
class EndCosts:
    """Seconds the work after the last step takes, as measured by this process; a time limit
    leaves room for them."""
    checkpoint_s: float  # one checkpoint, from its start to its commit: the longest seen, or an assumption
    checkpoint_measured: bool = False
    eval_batch_s: float = 0.0  # one global evaluation batch
    sample_s: float = 0.0  # one sample of train.sample_tokens tokens


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
# Under train.time_limit_s, the final evaluation and samples get at most this share of the
# budget (the evaluation first): an expensive evaluation must not eat the training.
END_SHARE = 0.1
# A checkpoint's cost until one is measured: the state at a slow network filesystem's pace.
ASSUMED_WRITE_BYTES_PER_S = 100e6


def process_start_time() -> float | None:
    """When this process started (from /proc on Linux; None elsewhere), so that a time limit
    also covers the seconds Python and torch take to load, which are many on a busy machine."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


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


def lock_run_dir_once(run_dir: Path) -> rundir.RunDirLock | None:
    """The job's lock on its run directory. Under torchrun rank 0 holds it for the whole job
    (a restart starts a fresh rank 0, whose predecessor's lock died with it); if another
    trainer holds it, every rank stops with rank 0's message rather than waiting for it."""
    if not torch.distributed.is_initialized():
        return rundir.RunDirLock(run_dir)
    lock, refusal = None, [None]
    if is_main_process():
        try:
            lock = rundir.RunDirLock(run_dir)
        except ConfigError as err:
            refusal = [str(err)]
    torch.distributed.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise ConfigError(refusal[0])
    return lock


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
    flight finishes and a checkpoint is written before exiting. Held until the trainer has
    closed: once the final checkpoint is committed the run is finished, and a signal only cuts
    the optional end (final evaluation, samples, plots) short; it cannot turn exit 0 into a crash."""

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
    def __init__(self, cfg: Config, started_at: float | None = None):
        """`started_at`: when the command started (default now); train.time_limit_s counts from it."""
        self.started_at = started_at or time.time()
        self.cfg = cfg
        t = cfg.train
        self.run_dir = cfg.run_dir
        # The layout is checked before any process group, data or model exists.
        self.dims = parallel_dims(cfg, resolve_model_args(cfg))
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.dtype, self.device)
        self.owns_process_group = init_distributed(self.device, cfg.fault.startup_timeout_s, self.run_dir)
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
        self.faults = FaultPlan.from_env(self.run_dir, global_rank(), self.dims.world_size)
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
        self.loader = BatchLoader(self.data.split("train"), self.seq_len, self.dims.global_batch, seed=t.seed,
                                  rank=self.parallel.dp_rank, world_size=self.dims.dp)

        self.tokens_per_step = self.dims.global_batch * self.seq_len
        self.flops_per_token = training_flops_per_token(self.model_args, self.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.step = 0
        self.train_time_s = 0.0
        self.schedule_steps = schedule_horizon(t, None)
        self.costs = EndCosts(checkpoint_s=self.assumed_checkpoint_s())
        self.eval_batches_done = 0
        # Where this process's time went (docs/training.md, "Time limit"); training is the rest.
        self.spent = {"startup": 0.0, "checkpoints": 0.0, "evaluation": 0.0, "samples_plots": 0.0}
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.checkpointer = checkpoint.Checkpointer(self.checkpoint_dir, t.keep_checkpoints, t.async_checkpoint,
                                                    faults=self.faults, on_event=self.on_checkpoint_event)
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
                "tokens_seen": self.step * self.tokens_per_step, "layout": self.layout(),
                "schedule_steps": self.schedule_steps, "identity": self.identity}

    @cached_property
    def identity(self) -> dict:
        """The model shape, tokenizer and data a resume must match (rundir.identity)."""
        return rundir.identity(self.model_args, self.data)

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
                f"the checkpoint at step {self.step} could not be written ({self.checkpointer.last_failure}); "
                f"the run can resume from the previous one once the storage is fixed")
        if self.checkpointer.async_save:
            self.event({"event": "final_checkpoint_wait", "step": self.step, "wait_s": time.perf_counter() - started})

    def resume(self) -> bool:
        restored = checkpoint.restore(self.checkpoint_dir, self.parallel.parts, self.optimizers,
                                      report=self.report, group=self.checkpointer.group, check=self.check_identity)
        # A one-time switch: config.json, written next, keeps it false, so that a later resume
        # on yet other data is refused again.
        self.cfg.data.allow_change = False
        if restored is None:
            return False
        state = restored[1]
        self.step = state["step"]
        self.train_time_s = state.get("train_time_s", 0.0)
        self.schedule_steps = schedule_horizon(self.cfg.train, state.get("schedule_steps"))
        trained_on = state.get("identity", {}).get("data")
        if trained_on is None or trained_on["sha256"] == self.identity["data"]["sha256"]:
            self.loader.load_state_dict(state["loader"])
        # else other data, as data.allow_change asked: its position means nothing there; read it from the start
        return True

    def check_identity(self, path: Path, state: dict) -> None:
        """Refuse to resume checkpoint `path` with another model, tokenizer or data than it was
        trained with (before any tensor is loaded). A checkpoint written before identities were
        saved has none: its tensors' shapes are still checked as it loads."""
        if "identity" not in state:
            return
        try:
            differences = rundir.identity_differences(state["identity"], self.identity, self.cfg.data.allow_change)
        except (KeyError, TypeError, AttributeError) as err:  # damaged like any unreadable file: an older one may do
            raise checkpoint.CheckpointError(f"its {checkpoint.STATE_FILE} holds a malformed identity "
                                             f"({type(err).__name__}: {err})") from None
        if differences:
            raise checkpoint.CheckpointMismatch(f"cannot resume {self.run_dir} from {path.name}: " + "; ".join(differences))

    def event(self, record: dict) -> None:
        """One line of events.jsonl (rank 0): restarts, checkpoints, faults. Never truncated."""
        self.events.write({**record, "time": time.time()})

    def report(self, message: str) -> None:
        if self.is_main:
            print(f"gigatrain: {message}", file=sys.stderr, flush=True)
            self.event({"event": "checkpoint_report", "message": message})

    def evaluate(self, max_batches: int | None = None, cut=None) -> tuple[float, float]:
        """Mean loss over the first max_batches (default train.eval_batches) global batches of
        the val split (the same windows under every layout), and bits per byte. `cut`, asked
        before each batch after the first with the batch's cost (every rank must answer the
        same), may end it early; then the result stands for the batches done."""
        split = self.data.split("val")
        batch, local = self.dims.global_batch, self.loader.local_batch
        mine = slice(self.parallel.dp_rank * local, (self.parallel.dp_rank + 1) * local)
        loss_sum, count, done = torch.zeros((), device=self.device), 0, 0
        started = time.perf_counter()
        self.parallel.train(False)
        for inputs, targets in eval_batches(split, self.seq_len, batch, max_batches or self.cfg.train.eval_batches):
            if done and cut is not None and cut(self.costs.eval_batch_s):
                break
            inputs, targets = pad_batch(inputs, targets, batch)
            loss_sum += self.parallel.loss_sum(inputs[mine], targets[mine]).float()
            count += int((targets != IGNORE).sum())
            done += 1
        self.parallel.train(True)
        loss = self.parallel.reduce_sum(loss_sum).item() / max(1, count)
        elapsed = time.perf_counter() - started  # after .item(): a GPU has finished the batches too
        self.costs.eval_batch_s = elapsed / max(1, done)
        self.spent["evaluation"] += elapsed
        self.eval_batches_done = done
        # The evaluated windows are a sample of the split: convert with the split's bytes per token.
        return loss, loss / (math.log(2) * split.bytes_per_token)

    def write_samples(self, count: int, cut=None) -> None:
        """Up to `count` samples into samples.txt; `cut`, asked before each with its cost, may end them early."""
        if not count or self.dims.world_size > 1:
            return  # sampling runs the whole model in one process: `gigatrain generate RUN` after training
        prompts = DEFAULT_CORPUS_PROMPTS if not self.cfg.data.path else [""]
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        lines = []
        with self.timed("samples_plots"):
            for i in range(count):
                if cut is not None and cut(self.costs.sample_s):
                    break
                started = time.perf_counter()
                prompt = prompts[i % len(prompts)]
                text = sample_text(self.model, self.data.tokenizer, prompt, self.cfg.train.sample_tokens,
                                   generator=generator, **self.sampling())
                lines.append(f"--- sample {i + 1} (step {self.step}, prompt {prompt!r}) ---\n{text}\n")
                self.costs.sample_s = time.perf_counter() - started
        if lines:
            (self.run_dir / "samples.txt").write_text("\n".join(lines))

    def sampling(self) -> dict:
        return dict(temperature=0.8, top_k=50, context_len=self.seq_len, device=self.device, dtype=self.dtype)

    # -- the time budget (train.time_limit_s) ------------------------------------------------------
    @contextmanager
    def timed(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[phase] += time.perf_counter() - started

    @property
    def deadline(self) -> float:
        t = self.cfg.train
        return self.started_at + t.time_limit_s if t.time_limit_s else math.inf

    def assumed_checkpoint_s(self) -> float:
        """A checkpoint's cost until one is measured: this rank's weights and two AdamW moments
        at ASSUMED_WRITE_BYTES_PER_S, plus a second for DCP's planning and commit."""
        local = (p.to_local() if hasattr(p, "to_local") else p for p in self.parallel.parameters())
        return 1.0 + 3 * sum(p.numel() * p.element_size() for p in local) / ASSUMED_WRITE_BYTES_PER_S

    def on_checkpoint_event(self, record: dict) -> None:
        if record["event"] == "checkpoint":  # the first measurement replaces the assumption
            seen = self.costs.checkpoint_s if self.costs.checkpoint_measured else 0.0
            self.costs.checkpoint_s, self.costs.checkpoint_measured = max(seen, record["write_s"]), True
        self.event(record)

    def measure_end_costs(self) -> None:
        """Time one evaluation batch and one sampled token, what the end of the run is planned from."""
        self.evaluate(max_batches=1)
        if self.dims.world_size == 1 and self.cfg.train.samples:
            with self.timed("samples_plots"):
                started = time.perf_counter()
                generate(self.model, [self.data.tokenizer.eot_id] * self.seq_len, 1, **self.sampling())
                self.costs.sample_s = (time.perf_counter() - started) * self.cfg.train.sample_tokens

    def end_plan(self) -> tuple[int, int]:
        """How many evaluation batches and samples the end of the run has room for: all of them
        without a time limit; under one, what fits in END_SHARE of it, the evaluation first."""
        t = self.cfg.train
        samples = t.samples if self.dims.world_size == 1 else 0
        if not t.time_limit_s:
            return t.eval_batches, samples
        share = END_SHARE * t.time_limit_s
        batches = min(t.eval_batches, max(1, int(share / max(self.costs.eval_batch_s, 1e-9))))
        left = share - batches * self.costs.eval_batch_s
        return batches, min(samples, int(left / self.costs.sample_s) if self.costs.sample_s else samples)

    def end_reserve_s(self) -> float:
        """Seconds the run needs after its last step: the final checkpoint, evaluation and samples."""
        batches, samples = self.end_plan()
        return self.costs.checkpoint_s + batches * self.costs.eval_batch_s + samples * self.costs.sample_s

    def next_step_s(self, last_step_time: float) -> float:
        """What the next step will take: as long as the last, plus an evaluation if one is due."""
        t, step = self.cfg.train, self.step + 1
        evaluates = step % t.eval_every == 0 and step < t.max_steps
        return last_step_time + (t.eval_batches * self.costs.eval_batch_s if evaluates else 0.0)

    def agree(self, reason: str | None) -> str | None:
        """The reason every rank acts on: a signal or the clock may reach one rank before another,
        and ranks that act apart hang in a collective. The highest of STOP_REASONS wins."""
        if self.mesh is None:
            return reason
        code = torch.tensor([STOP_REASONS.index(reason)], device=self.device)
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        return STOP_REASONS[int(code.item())]

    def should_stop(self, stop: StopSignal, last_step_time: float, start_step: int) -> str | None:
        """Why to stop after this step, agreed by every rank."""
        t = self.cfg.train
        reason = None
        if stop.received:
            reason = stop.received
        elif t.stop_at_step and self.step == t.stop_at_step and self.step > start_step:
            reason = "stop_at_step"
        elif time.time() + self.next_step_s(last_step_time) + self.end_reserve_s() > self.deadline:
            reason = "time_limit"
        return self.agree(reason)

    # -- the loop -----------------------------------------------------------------------
    def run(self, stop: StopSignal | None = None) -> TrainResult:
        """Train to the end. `train()` passes a `stop` that it holds until the trainer has closed
        (see StopSignal); without one, the run holds its own while it trains."""
        if stop is None:
            with StopSignal() as own:
                return self.run(own)
        # Watched from here on: a rank stuck loading the checkpoint is a hang like any other.
        watchdog = Watchdog(self.cfg.fault.watchdog_s, self.run_dir, global_rank(), first="loading the checkpoint")
        try:
            return self._run(watchdog, stop)
        finally:
            watchdog.stop()

    def _run(self, watchdog: Watchdog, stop: StopSignal) -> TrainResult:
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
                    "process_start": self.started_at, "schedule_steps": self.schedule_steps})
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
        if t.time_limit_s:
            self.measure_end_costs()
        self.spent["startup"] = time.time() - self.started_at - self.spent["evaluation"] - self.spent["samples_plots"]

        stopped_by, loss, val, cut_by = "max_steps", float("nan"), (None, None), None
        last_step_time = 0.0
        try:
            while self.step < t.max_steps:
                if restart is not None:  # the first step of a resumed process: the restart is over
                    previous_end = restart.pop("previous_end")
                    self.event({**restart, "restart_s": time.time() - previous_end})
                    restart = None
                step_start = time.perf_counter()
                self.faults.before_step(self.step + 1)
                inputs, targets = self.loader.next_batch()
                lr = lr_at(self.step + 1, t, self.schedule_steps)
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
                stopped_by = self.should_stop(stop, last_step_time, start_step) or "max_steps"
                if stopped_by != "max_steps" or at_end:
                    break
                if self.step % t.checkpoint_every == 0:
                    self.spent["checkpoints"] += self.save_checkpoint()
                    watchdog.beat()

            display.close()
            if stopped_by in PREEMPTION_SIGNALS:
                display.message(f"{stopped_by}: saving a checkpoint at step {self.step}, then exiting for a requeue")
            watchdog.beat("the final checkpoint")
            with self.timed("checkpoints"):
                if self.step > start_step or not resumed:
                    self.final_checkpoint()
                else:
                    self.checkpointer.wait()
            # The run is finished once its final checkpoint is committed; a signal before that stops it as documented.
            stopped_by = self.agree(stop.received) or stopped_by
            if stopped_by in ("max_steps", "time_limit"):
                watchdog.beat("the final evaluation")
                val, cut_by = self.end_of_run(stop, metrics)
        finally:
            self.checkpointer.close()
        metrics.close()
        if self.is_main:
            self.draw_plots(stop, cut_by)
        spent = self.time_spent()
        self.event({"event": "stop", "step": self.step, "reason": stopped_by, "cut_short_by": cut_by,
                    "time_spent": spent})
        self.events.close()
        message = f"stopped by {stopped_by} at step {self.step}"
        if val[0] is not None:
            message += f"; val loss {val[0]:.4f}, {val[1]:.4f} bits/byte"
        if cut_by:
            message += f"; {cut_by} cut the end short"
        message += "; time " + ", ".join(f"{name.replace('_', '/')} {s:.1f} s" for name, s in spent.items())
        display.message(message + f"; run directory {self.run_dir}")
        return TrainResult(self.run_dir, self.step, stopped_by, loss, *val)

    def end_of_run(self, stop: StopSignal, metrics: MetricsFile) -> tuple[tuple, str | None]:
        """The optional work of a finished run: the final evaluation and samples, as much as the
        time limit leaves room for. A signal now cuts it short and drops a partial evaluation.
        Returns the evaluation and what cut the end short (a signal, time_limit or None)."""
        cut_by = None

        def cut(next_s: float) -> bool:  # agreed by every rank, as evaluate() needs
            nonlocal cut_by
            late = "time_limit" if time.time() + next_s > self.deadline else None
            cut_by = cut_by or self.agree(stop.received or late)
            return cut_by is not None

        batches, samples = self.end_plan()
        val = (None, None)
        if not cut(self.costs.eval_batch_s):
            val = self.evaluate(batches, cut)
            if cut_by in (None, "time_limit"):  # a partial evaluation stands for its first batches
                metrics.write({"step": self.step, "val_loss": val[0], "val_bpb": val[1],
                               "val_batches": self.eval_batches_done})
            else:
                val = (None, None)
        self.write_samples(samples, cut)
        return val, cut_by

    def draw_plots(self, stop: StopSignal, cut_by: str | None) -> None:
        """loss.png and throughput.png, unless a signal or the time limit has cut the end short
        (`gigatrain report RUN` draws them later)."""
        if cut_by or stop.received or time.time() > self.deadline:
            return
        with self.timed("samples_plots"):
            plot_run(self.run_dir)

    def time_spent(self) -> dict:
        """Seconds of this process by phase; training is what the others leave."""
        total = time.time() - self.started_at
        spent = {name: round(s, 2) for name, s in self.spent.items()}
        return {"total": round(total, 2), "training": round(total - sum(self.spent.values()), 2), **spent}

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

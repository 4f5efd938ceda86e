"""The training loop.

The data flow is the architecture:

    config -> data -> model -> parallelize -> optimizer -> loader
           -> [resume from checkpoint] -> loop(step, eval, checkpoint, metrics) -> final checkpoint, eval, plots, samples

Everything the loop needs to continue exactly where it stopped (weights,
optimizer state, step, data position, RNG) goes into each checkpoint.
"""

from __future__ import annotations

import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.config import Config, ConfigError, apply_overrides, from_dict, load_config, resolve_model_args
from gigatrain.data.loader import BatchLoader, TokenData, eval_batches
from gigatrain.data.prepare import ensure_default_data
from gigatrain.metrics.logger import MetricsFile, ProgressDisplay, truncate_after
from gigatrain.metrics.mfu import peak_flops
from gigatrain.metrics.plots import plot_run
from gigatrain.models.flops import param_counts, training_flops_per_token
from gigatrain.models.transformer import Transformer
from gigatrain.parallel import parallelize, world_size
from gigatrain.paths import cache_dir
from gigatrain.train import rundir
from gigatrain.train.evaluate import autocast, loss_fn, mean_loss, sample_text
from gigatrain.train.optim import build_optimizer
from gigatrain.train.schedule import lr_at

# No trailing space: BPE merges a space into the next word, so "def " would end on a lone space.
DEFAULT_CORPUS_PROMPTS = ["def", "class", "import"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_by: str  # max_steps | stop_at_step | time_limit | SIGINT | SIGTERM
    final_loss: float
    val_loss: float | None
    val_bpb: float | None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use train.device=cpu or auto")
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


def check_layout(cfg: Config) -> None:
    """Resolve the parallel degrees (planner's choice, or -1 inferred) and check that they
    multiply to the number of processes."""
    p = cfg.parallel
    names = ("dp_replicate", "dp_shard", "tp", "pp", "cp")
    if p.auto:
        from gigatrain.plan.layout import auto_layout

        chosen = auto_layout(resolve_model_args(cfg), world_size(), cfg.data.seq_len, cfg.train.batch_size,
                             device_catalog_name())
        for name in names:
            setattr(p, name, chosen[name])
    fixed = math.prod(getattr(p, n) for n in names if getattr(p, n) != -1)
    for name in names:
        if getattr(p, name) == -1:
            if world_size() % fixed:
                raise ConfigError(f"parallel.{name}=-1 cannot be inferred: the other degrees multiply to {fixed}, "
                                  f"which does not divide the world size {world_size()}")
            setattr(p, name, world_size() // fixed)
    product = math.prod(getattr(p, n) for n in names)
    if product != world_size():
        layout = " x ".join(f"{n}={getattr(p, n)}" for n in names)
        raise ConfigError(f"parallel layout {layout} needs {product} processes but this run has {world_size()}; "
                          f"set the parallel degrees so that they multiply to {world_size()}")


def device_catalog_name() -> str:
    """The planner's hardware-catalog name of this machine's accelerator ('cpu' without one)."""
    if not torch.cuda.is_available():
        return "cpu"
    from gigatrain.plan.catalog import accelerator_for_device

    return accelerator_for_device(torch.cuda.get_device_name()).name


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so the step in
    flight finishes and a checkpoint is written before exiting."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
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
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.dtype, self.device)
        check_layout(cfg)
        torch.manual_seed(t.seed)

        self.data = open_data(cfg)
        self.seq_len = cfg.data.seq_len
        self.model_args = resolve_model_args(cfg, vocab_size=self.data.vocab_size)
        with torch.device(self.device):
            model = Transformer(self.model_args)
        self.model = parallelize(model, cfg)
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.loader = BatchLoader(self.data.split("train"), self.seq_len, t.batch_size, seed=t.seed)
        self.micro_batch = t.micro_batch_size or t.batch_size

        self.tokens_per_step = t.batch_size * self.seq_len
        self.flops_per_token = training_flops_per_token(self.model_args, self.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.step = 0
        self.train_time_s = 0.0
        self.checkpoint_dir = self.run_dir / "checkpoints"

    # -- one optimizer step ---------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_micro = inputs.shape[0] // self.micro_batch
        loss_sum = torch.zeros((), device=self.device)
        for micro_inputs, micro_targets in zip(inputs.split(self.micro_batch), targets.split(self.micro_batch)):
            with autocast(self.device, self.dtype):
                logits = self.model(micro_inputs.to(self.device, non_blocking=True))
            loss = loss_fn(logits, micro_targets.to(self.device, non_blocking=True)) / n_micro
            loss.backward()
            loss_sum += loss.detach()
        max_norm = self.cfg.train.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.item(), grad_norm.item()

    # -- state --------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "loader": self.loader.state_dict(), "train_time_s": self.train_time_s,
                "tokens_seen": self.step * self.tokens_per_step}

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self.checkpoint_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                               keep=self.cfg.train.keep_checkpoints)

    def resume(self) -> bool:
        path = checkpoint.latest(self.checkpoint_dir)
        if path is None:
            return False
        state = checkpoint.load(path, self.model, self.optimizer)
        self.step = state["step"]
        self.train_time_s = state.get("train_time_s", 0.0)
        self.loader.load_state_dict(state["loader"])
        return True

    def evaluate(self) -> tuple[float, float]:
        split = self.data.split("val")
        batches = eval_batches(split, self.seq_len, self.micro_batch, self.cfg.train.eval_batches)
        loss = mean_loss(self.model, batches, self.device, self.dtype)
        # The evaluated windows are a sample of the split: convert with the split's bytes per token.
        return loss, loss / (math.log(2) * split.bytes_per_token)

    def write_samples(self) -> None:
        t = self.cfg.train
        if not t.samples:
            return
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

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resume()
        start_step = self.step
        self.data.tokenizer.save(self.run_dir)
        rundir.write_run_files(self.run_dir, cfg, self.run_info())
        metrics_path = self.run_dir / rundir.METRICS_FILE
        truncate_after(metrics_path, self.step)
        metrics = MetricsFile(metrics_path)
        display = ProgressDisplay(t.progress, t.max_steps, self.step)
        counts = param_counts(self.model_args)
        display.message(f"run {self.run_dir}  model {cfg.model.preset} ({counts.total / 1e6:.2f}M params)  "
                        f"device {self.device}  {self.tokens_per_step:,} tokens/step"
                        + (f"  resumed at step {self.step}" if resumed else ""))
        if self.step >= t.max_steps:
            display.message(f"the run is already at train.max_steps={t.max_steps}; raise it to train on "
                            f"(e.g. --train.max_steps={2 * t.max_steps})")

        stopped_by, loss, val = "max_steps", float("nan"), (None, None)
        started = time.perf_counter()
        last_step_time = 0.0
        with StopSignal() as stop:
            while self.step < t.max_steps:
                step_start = time.perf_counter()
                inputs, targets = self.loader.next_batch()
                lr = lr_at(self.step + 1, t)
                loss, grad_norm = self.train_step(inputs, targets, lr)
                self.step += 1
                last_step_time = time.perf_counter() - step_start
                self.train_time_s += last_step_time
                tokens_per_s = self.tokens_per_step / last_step_time
                record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
                          "step_time_s": last_step_time, "tokens": self.step * self.tokens_per_step,
                          "peak_memory_gb": peak_memory_gb(self.device), "time": time.time()}
                metrics.write(record)
                display.step(record)

                at_end = self.step >= t.max_steps
                if self.step % t.eval_every == 0 and not at_end:
                    val = self.evaluate()
                    metrics.write({"step": self.step, "val_loss": val[0], "val_bpb": val[1]})
                    display.message(f"step {self.step}: val loss {val[0]:.4f}, {val[1]:.4f} bits/byte")
                if stop.received:
                    stopped_by = stop.received
                elif t.stop_at_step and self.step == t.stop_at_step and self.step > start_step:
                    stopped_by = "stop_at_step"
                elif t.time_limit_s and time.perf_counter() - started + last_step_time > t.time_limit_s:
                    stopped_by = "time_limit"
                if stopped_by != "max_steps" or at_end:
                    break
                if self.step % t.checkpoint_every == 0:
                    self.save_checkpoint()

        display.close()
        if self.step > start_step or not resumed:
            self.save_checkpoint()
        if stopped_by in ("max_steps", "time_limit"):
            val = self.evaluate()
            metrics.write({"step": self.step, "val_loss": val[0], "val_bpb": val[1]})
            self.write_samples()
        metrics.close()
        plot_run(self.run_dir)
        message = f"stopped by {stopped_by} at step {self.step}"
        if val[0] is not None:
            message += f"; val loss {val[0]:.4f}, {val[1]:.4f} bits/byte"
        display.message(message + f"; run directory {self.run_dir}")
        return TrainResult(self.run_dir, self.step, stopped_by, loss, *val)

    def run_info(self) -> dict:
        return {
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "world_size": world_size(),
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
    return Trainer(cfg).run()

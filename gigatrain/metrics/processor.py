"""What a run records as it trains: one metrics.jsonl line per step (throughput, MFU, memory)
and per evaluation, events.jsonl, and the progress display. Rank 0 writes; the other ranks
of a multi-process run hold a processor that discards."""

from __future__ import annotations

import resource
import time

import torch

from gigatrain.metrics.logger import MetricsFile, ProgressDisplay
from gigatrain.rundir import RunDir


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, world_size: int) -> float:
    """Model FLOPs utilisation: the model's training FLOPs per second over the job's peak."""
    return tokens_per_s * flops_per_token / (peak_flops * world_size)


class MetricsProcessor:
    def __init__(self, run_dir: RunDir | None, *, tokens_per_step: int, flops_per_token: float, peak_flops: float,
                 world_size: int, device: torch.device):
        """run_dir None: record nothing (ranks other than 0)."""
        self.run_dir = run_dir
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops, self.world_size, self.device = peak_flops, world_size, device
        self.events = MetricsFile(run_dir.events if run_dir else None)
        self.metrics: MetricsFile | None = None
        self.display: ProgressDisplay | None = None

    def event(self, record: dict) -> None:
        """One line of events.jsonl: restarts, checkpoints, faults. Never truncated."""
        self.events.write({**record, "time": time.time()})

    def start(self, step: int, progress: str, max_steps: int) -> None:
        """Open metrics.jsonl at `step` (the lines of later steps, about to be recomputed,
        are dropped) and start the display there."""
        self.metrics = MetricsFile(self.run_dir.metrics if self.run_dir else None)
        self.metrics.truncate_after(step)
        self.display = ProgressDisplay(progress if self.run_dir else "off", max_steps, step)

    def step_record(self, step: int, loss: float, lr: float, grad_norm: float, step_time_s: float,
                    skipped: str | None = None, extra: dict | None = None) -> dict:
        """`extra`: more fields of the step (an MoE run's router statistics)."""
        tokens_per_s = self.tokens_per_step / step_time_s  # the whole job's
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                  "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.world_size),
                  "step_time_s": step_time_s, "tokens": step * self.tokens_per_step,
                  "peak_memory_gb": peak_memory_gb(self.device), "time": time.time()}
        if extra:
            record.update(extra)
        if skipped:
            record["skipped"] = skipped
        return record

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float, step_time_s: float,
                 skipped: str | None = None, extra: dict | None = None) -> dict:
        """The step's record, written and shown."""
        record = self.step_record(step, loss, lr, grad_norm, step_time_s, skipped, extra)
        self.metrics.write(record)
        self.display.step(record)
        return record

    def log_eval(self, step: int, val_loss: float, val_bpb: float) -> None:
        """An evaluation during training, written and shown."""
        self.metrics.write({"step": step, "val_loss": val_loss, "val_bpb": val_bpb})
        self.message(f"step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte")

    def log_final_eval(self, step: int, val_loss: float, val_bpb: float, batches: int) -> None:
        """The final evaluation, over `batches` (all that the time limit left room for); the
        run's last line shows it."""
        self.metrics.write({"step": step, "val_loss": val_loss, "val_bpb": val_bpb, "val_batches": batches})

    def truncate_after(self, step: int) -> None:
        self.metrics.truncate_after(step)

    def message(self, text: str) -> None:
        self.display.message(text)

    def close_display(self) -> None:
        self.display.close()

    def close_metrics(self) -> None:
        self.metrics.close()

    def close_events(self) -> None:
        self.events.close()

"""When a run stops: signals, train.stop_at_step and the time limit, agreed by every rank;
and the clock the time limit counts on (docs/training.md, "Time limit")."""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# Why a run stopped; the index is what ranks agree on (the highest wins).
STOP_REASONS = [None, "stop_at_step", "time_limit", "SIGTERM", "SIGUSR1", "SIGINT"]
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")  # SIGUSR1: Slurm's warning before the time limit


def process_start_time() -> float | None:
    """When this process started (from /proc on Linux; None elsewhere), so that a time limit
    also covers the seconds Python and torch take to load, which are many on a busy machine."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        # Seconds since boot now, to 10 ms (/proc/stat's boot time is whole seconds: up to a
        # second off, which is more than some phases of a restart take).
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


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


class RunClock:
    """This process's time: the deadline of train.time_limit_s (counted from when the command
    started) and where the seconds went by phase; training is what the others leave."""

    PHASES = ("startup", "checkpoints", "evaluation", "samples_plots")

    def __init__(self, started_at: float, time_limit_s: float):
        self.started_at = started_at
        self.deadline = started_at + time_limit_s if time_limit_s else math.inf
        self.spent = dict.fromkeys(self.PHASES, 0.0)

    @contextmanager
    def timed(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[phase] += time.perf_counter() - started

    def end_startup(self) -> None:
        """Startup is everything before the first step that no other phase took."""
        self.spent["startup"] = time.time() - self.started_at - self.spent["evaluation"] - self.spent["samples_plots"]

    def late(self, *seconds_ahead: float) -> bool:
        """Whether work of these seconds, started now, would end past the deadline."""
        return sum(seconds_ahead, time.time()) > self.deadline

    def time_spent(self) -> dict:
        total = time.time() - self.started_at
        spent = {name: round(s, 2) for name, s in self.spent.items()}
        return {"total": round(total, 2), "training": round(total - sum(self.spent.values()), 2), **spent}


class Stopping:
    """Why to stop, agreed by every rank: a signal or the clock may reach one rank before
    another, and ranks that act apart hang in a collective."""

    def __init__(self, stop_at_step: int, signal: StopSignal, clock: RunClock, mesh, device: torch.device):
        self.stop_at_step = stop_at_step
        self.signal = signal
        self.clock = clock
        self.mesh = mesh
        self.device = device

    def agree(self, reason: str | None) -> str | None:
        """The reason every rank acts on: the highest of STOP_REASONS wins."""
        if self.mesh is None:
            return reason
        code = torch.tensor([STOP_REASONS.index(reason)], device=self.device)
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        return STOP_REASONS[int(code.item())]

    def after_step(self, step: int, start_step: int, next_step_s: float, end_reserve_s: float) -> str | None:
        """Why to stop after `step`: a signal, train.stop_at_step (not at the step a process
        resumed at), or a time limit that the next step and the end of the run would overrun."""
        reason = None
        if self.signal.received:
            reason = self.signal.received
        elif self.stop_at_step and step == self.stop_at_step and step > start_step:
            reason = "stop_at_step"
        elif self.clock.late(next_step_s, end_reserve_s):
            reason = "time_limit"
        return self.agree(reason)

    def end_cut(self) -> EndCut:
        return EndCut(self)


class EndCut:
    """Asked before each piece of a finished run's optional end (evaluation batches, samples)
    with its cost: whether a signal or the time limit cuts the end short here. Every rank
    answers the same; once cut, it stays cut, and `by` says what cut it."""

    def __init__(self, stopping: Stopping):
        self.stopping = stopping
        self.by: str | None = None

    def __call__(self, next_s: float) -> bool:
        late = "time_limit" if self.stopping.clock.late(next_s) else None
        self.by = self.by or self.stopping.agree(self.stopping.signal.received or late)
        return self.by is not None

"""Recovery inside a run and across its restarts (docs/fault-tolerance.md): the numerical
guard's skipped updates and rollbacks, and what an interruption of the run cost (restart and
recomputed steps, in events.jsonl, from which the run's goodput is measured), split into the
phases of the process's start (`StartPhases`)."""

from __future__ import annotations

import os
import statistics
import time

from gigatrain.config import FaultConfig
from gigatrain.fault.guard import NumericalGuard, TrainingDiverged
from gigatrain.fault.spare import CHILD_ENV as SPARE_CHILD_ENV
from gigatrain.metrics.processor import MetricsProcessor
from gigatrain.rundir import RunDir
from gigatrain.train.checkpointing import CheckpointManager
from gigatrain.train.stopping import PREEMPTION_SIGNALS


def previous_segment(records: list[dict], events: list[dict], step: int, started_at: float) -> dict | None:
    """If a process resumed at `step` continues a run that an earlier one started, what the
    interruption cost: the steps it did after that checkpoint (to be done again), and when it
    was last seen alive (restart time is measured up to our first step). A `continue` event
    instead if the earlier process had finished; None for a new run."""
    if not records and not events:
        return None
    lost = [r for r in records if "loss" in r and r["step"] > step]
    last_seen = max([r.get("time", 0) for r in records] + [e.get("time", 0) for e in events])
    stop = events[-1] if events and events[-1].get("event") == "stop" else None
    if stop is not None and stop.get("reason") not in PREEMPTION_SIGNALS:
        # It had finished (max_steps, stop_at_step, time limit, Ctrl-C): continuing it later
        # is new work, not a restart, and the time in between is no one's loss.
        return {"event": "continue", "step": step, "idle_s": started_at - last_seen}
    return {"event": "restart", "step": step, "after": "preemption" if stop else "failure",
            "recomputed_steps": len(lost), "recomputed_s": sum(r["step_time_s"] for r in lost),
            "previous_end": last_seen}


# Where a start's seconds go, in order (docs/fault-tolerance.md, "Where restart time goes").
PHASES = ("detect_s", "start_s", "imports_s", "rendezvous_s", "build_s", "load_s", "compile_s", "first_step_s")
# The milestones the trainer reaches, each ending the phase of the same name.
MILESTONES = ("imports", "rendezvous", "build", "load")


class StartPhases:
    """When this process reached each milestone of its start, from the OS's start of the process:
    imports (the trainer is called: Python, torch and gigatrain loaded, the config read),
    rendezvous (process group and mesh), build (data opened, model built and parallelized,
    optimizer and components), load (state restored); then the first step."""

    def __init__(self, process_start: float):
        self.process_start = process_start
        self.reached_at = {"imports": time.time()}

    def reached(self, milestone: str) -> None:
        assert milestone in MILESTONES, milestone
        self.reached_at[milestone] = time.time()

    def split(self, begin: float, first_step_end: float, first_step_s: float, normal_step_s: float | None) -> dict:
        """Seconds from `begin` (the previous process's last sign of life, or this process's
        start) to the end of the first step, by phase; they sum to first_step_end - begin.
        Torchrun does not say when it noticed a failure, so detection and the new process's
        spawn are one span, held in detect_s (start_s 0). compile_s: the first step's time
        over a normal step's (0 where none is known yet)."""
        marks = [self.reached_at[m] for m in MILESTONES]
        extra = max(0.0, first_step_s - normal_step_s) if normal_step_s is not None else 0.0
        rest = first_step_end - marks[-1]
        compile_s = min(extra, rest)
        return {"detect_s": self.process_start - begin, "start_s": 0.0,
                "imports_s": marks[0] - self.process_start, "rendezvous_s": marks[1] - marks[0],
                "build_s": marks[2] - marks[1], "load_s": marks[3] - marks[2],
                "compile_s": compile_s, "first_step_s": rest - compile_s}


class Recovery:
    def __init__(self, cfg: FaultConfig, run_dir: RunDir | None, phases: StartPhases):
        """run_dir None: a rank other than 0, which keeps no account of the run's history."""
        self.cfg = cfg
        self.guard = NumericalGuard(cfg)
        self.run_dir = run_dir
        self.phases = phases
        self.started_at = phases.process_start
        # What earlier processes of this run left, read before this one writes anything.
        self.history = (run_dir.metrics_records(), run_dir.event_records()) if run_dir else ([], [])
        earlier_steps = [r["step_time_s"] for r in self.history[0] if "loss" in r and "step_time_s" in r]
        # A normal step's seconds, against which the first one's extra (compile, first-iteration
        # allocations) is measured: the earlier processes' median, else this process's second step.
        self.normal_step_s = statistics.median(earlier_steps) if earlier_steps else None
        self.start: dict | None = None  # this process's start or restart event, written after its first step
        self.first_step: tuple[float, float] | None = None  # (when it ended, its seconds)

    def begin(self, step: int, metrics: MetricsProcessor, loaded_from: str | None) -> None:
        """State is restored (from `loaded_from`), at the step this process starts from: a
        continued run is recorded now; the start or restart once its first step is done."""
        self.phases.reached("load")
        if self.run_dir is None:
            return
        segment = previous_segment(*self.history, step, self.started_at)
        if segment is not None and segment["event"] == "continue":
            metrics.event(segment)
        if segment is not None and segment["event"] == "restart":
            self.start = segment
        else:
            self.start = {"event": "startup", "step": step, "previous_end": self.started_at}
        self.start["loaded_from"] = loaded_from
        # Forked from the job's warm spare (its imports already done) rather than started cold.
        self.start["warm_spare"] = bool(os.environ.get(SPARE_CHILD_ENV))

    def after_step(self, step_s: float, metrics: MetricsProcessor) -> None:
        """A step of `step_s` seconds is done: once a normal step's time is known (the earlier
        processes', or this one's second step), the start's phases are written."""
        if self.start is None:
            return
        if self.first_step is None:
            self.first_step = (time.time(), step_s)
            if self.normal_step_s is None:
                return
        else:
            self.normal_step_s = step_s
        self.write_start(metrics)

    def write_start(self, metrics: MetricsProcessor) -> None:
        """The start's event: a `restart` (restart_s, from the previous process's last sign of
        life) or a `startup` (startup_s, from this process's start, without detect_s and
        start_s), each up to the end of the first step, with its phases. Written at the end of
        the loop by a process that did a single step."""
        if self.start is None or self.first_step is None:
            return
        record, self.start = self.start, None
        previous_end = record.pop("previous_end")
        first_step_end, first_step_s = self.first_step
        phases = self.phases.split(previous_end, first_step_end, first_step_s, self.normal_step_s)
        total = "restart_s" if record["event"] == "restart" else "startup_s"
        if total == "startup_s":
            del phases["detect_s"], phases["start_s"]
        # first_step_time_s: the first step's own training time, also counted as useful
        # (metrics.jsonl), which goodput takes out of the restart so it is not counted twice.
        metrics.event({**record, total: first_step_end - previous_end, "phases": phases,
                       "first_step_time_s": first_step_s})

    def state_received(self, step: int, loaded_from: str | None) -> None:
        """Before the first step: this process's state came from elsewhere after all (a replica
        group that is behind loads a healthy group's live state at its first quorum), so the
        restart resumes at `step`, with no steps to recompute past it."""
        if self.start is None or self.first_step is not None:
            return
        self.start["loaded_from"] = loaded_from
        if self.start["event"] == "restart" and step != self.start["step"]:
            lost = [r for r in self.history[0] if "loss" in r and r["step"] > step]
            self.start.update(step=step, recomputed_steps=len(lost), recomputed_s=sum(r["step_time_s"] for r in lost))

    def on_skipped_update(self, reason: str, step: int, loss: float, grad_norm: float, checkpoints: CheckpointManager,
                          metrics: MetricsProcessor) -> bool:
        """The guard skipped this step's update; after rollback_after in a row, roll back to the
        last checkpoint and carry on past the data that caused them. Returns whether it rolled back."""
        f = self.cfg
        metrics.event({"event": "skip", "step": step, "reason": reason, "loss": loss, "grad_norm": grad_norm,
                       "recent_mean": self.guard.mean()})
        metrics.message(f"step {step}: {'NaN/Inf loss or gradient' if reason == 'nan' else 'loss spike'} "
                        f"(loss {loss:.4g}, grad norm {grad_norm:.4g}); update skipped")
        if not self.guard.wants_rollback:
            return False
        if self.guard.rollbacks >= f.max_rollbacks:
            metrics.event({"event": "diverged", "step": step, "rollbacks": self.guard.rollbacks})
            raise TrainingDiverged(
                f"training keeps failing numerically: {f.rollback_after} skipped updates in a row at step {step} "
                f"after {self.guard.rollbacks} rollback(s) (fault.max_rollbacks={f.max_rollbacks}); lower train.lr, "
                f"check the data after the last checkpoint, or raise fault.max_rollbacks; "
                f"the last good checkpoint is in {checkpoints.directory}")
        restored = checkpoints.roll_back()
        if restored is None:
            raise TrainingDiverged(f"training failed numerically {f.rollback_after} times in a row at step {step} "
                                   f"before any checkpoint was written; lower train.lr or check the data")
        back_to = restored["step"]
        lost = [r for r in self.run_dir.metrics_records() if "loss" in r and r["step"] > back_to] if self.run_dir else []
        metrics.truncate_after(back_to)
        self.guard.rolled_back()
        metrics.event({"event": "rollback", "step": back_to, "from_step": step, "recomputed_steps": len(lost),
                       "recomputed_s": sum(r["step_time_s"] for r in lost), "rollbacks": self.guard.rollbacks})
        metrics.message(f"rolled back from step {step} to the checkpoint at step {back_to}; the data "
                        f"goes on past the window that failed (rollback {self.guard.rollbacks} of at most {f.max_rollbacks})")
        return True

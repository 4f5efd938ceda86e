"""Recovery inside a run and across its restarts (docs/fault-tolerance.md): the numerical
guard's skipped updates and rollbacks, and what an interruption of the run cost (restart and
recomputed steps, in events.jsonl, from which the run's goodput is measured)."""

from __future__ import annotations

import time

from gigatrain.config import FaultConfig
from gigatrain.fault.guard import NumericalGuard, TrainingDiverged
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


class Recovery:
    def __init__(self, cfg: FaultConfig, run_dir: RunDir | None, started_at: float):
        """run_dir None: a rank other than 0, which keeps no account of the run's history."""
        self.cfg = cfg
        self.guard = NumericalGuard(cfg)
        self.run_dir = run_dir
        self.started_at = started_at
        # What earlier processes of this run left, read before this one writes anything.
        self.history = (run_dir.metrics_records(), run_dir.event_records()) if run_dir else ([], [])
        self.restart: dict | None = None

    def begin(self, step: int, metrics: MetricsProcessor) -> None:
        """At the step this process starts from: a continued run is recorded now; a restart
        once its first step is done (`first_step`)."""
        segment = previous_segment(*self.history, step, self.started_at) if self.run_dir else None
        if segment is not None and segment["event"] == "continue":
            metrics.event(segment)
        elif segment is not None:
            self.restart = segment

    def first_step(self, metrics: MetricsProcessor, loaded_from: str | None = None, step: int | None = None) -> None:
        """The first step of a resumed process has begun: the restart is over. `loaded_from`:
        where its state came from (CheckpointManager.loaded_from); `step`: the step it starts
        from, when that moved past the resumed one (a replica group that received a healthy
        group's live state has no steps to recompute)."""
        if self.restart is not None:
            previous_end = self.restart.pop("previous_end")
            if step is not None and step != self.restart["step"]:
                lost = [r for r in self.history[0] if "loss" in r and r["step"] > step]
                self.restart.update(step=step, recomputed_steps=len(lost), recomputed_s=sum(r["step_time_s"] for r in lost))
            metrics.event({**self.restart, "restart_s": time.time() - previous_end, "loaded_from": loaded_from})
            self.restart = None

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

"""Goodput of a run, from its events.jsonl and metrics.jsonl, in the planner's terms.

The planner's reliability model (gigatrain/plan/reliability.py) splits a run's wall time into
useful training, work lost since the last checkpoint and re-computed after an interruption,
restarts (detect, start again, load the checkpoint), and checkpoint writes that block
training. A run measures each of these:

- useful_s: the step time of the steps in the final history (each counted once), less skipped updates;
- recomputed_s: the step time of steps that were done, then lost (a crash after them, before
  the next checkpoint; or a rollback), and so done again;
- restart_s: from the last sign of life of the previous process to the end of the next one's
  first step (by phase in the event: docs/fault-tolerance.md, "Where restart time goes");
- checkpoint_stall_s: the time training waited for checkpoints (the copy, for async saves);
- skipped_s: steps whose update the numerical guard skipped;
- other_s: the rest (start-up, evaluation, logging); the planner's model leaves it out.

goodput = useful_s / wall_s. planner_goodput is the planner's closed form given this run's own
interruption rate, restart time, checkpoint interval and stall, over the same useful time.
"""

from __future__ import annotations

import statistics

from gigatrain.plan.reliability import expected_run_hours
from gigatrain.rundir import RunDir

NO_FAILURES_MTBI_S = 1e18  # "never": the closed form then reduces to work plus checkpoint writes


def summarize(run: RunDir) -> dict | None:
    """The run's goodput and where the rest of its wall time went (None: no events.jsonl, or no steps)."""
    events = run.event_records()
    steps = [r for r in run.metrics_records() if "loss" in r and "step_time_s" in r]
    starts = [e.get("process_start", e["time"]) for e in events if e.get("event") == "start"]
    if not starts or not steps:
        return None
    end = max([r.get("time", 0) for r in steps] + [e.get("time", 0) for e in events])
    # A finished run continued later (a higher max_steps) does not count the time in between.
    idle = sum(e["idle_s"] for e in events if e.get("event") == "continue")
    wall = end - min(starts) - idle
    useful = sum(r["step_time_s"] for r in steps if not r.get("skipped"))
    skipped = sum(r["step_time_s"] for r in steps if r.get("skipped"))
    restarts = [e for e in events if e.get("event") == "restart"]
    rollbacks = [e for e in events if e.get("event") == "rollback"]
    checkpoints = [e for e in events if e.get("event") in ("checkpoint", "checkpoint_failed") and "stall_s" in e]
    failures = [e for e in restarts if e.get("after") == "failure"]
    restart_s = sum(e["restart_s"] for e in restarts)
    recomputed_s = sum(e["recomputed_s"] for e in restarts + rollbacks)
    stall_s = sum(e["stall_s"] for e in checkpoints)
    summary = {
        "wall_s": wall,
        "useful_s": useful,
        "goodput": useful / wall if wall > 0 else 0.0,
        "restarts": len(restarts),
        "failures": len(failures),
        "restart_s": restart_s,
        "recomputed_steps": sum(e["recomputed_steps"] for e in restarts + rollbacks),
        "recomputed_s": recomputed_s,
        "checkpoints": sum(1 for e in events if e.get("event") == "checkpoint"),
        "checkpoint_failures": sum(1 for e in events if e.get("event") == "checkpoint_failed"),
        "checkpoint_stall_s": stall_s,
        "skipped_steps": sum(1 for r in steps if r.get("skipped")),
        "skipped_s": skipped,
        "rollbacks": len(rollbacks),
        "other_s": wall - useful - skipped - restart_s - recomputed_s - stall_s,
    }
    summary["planner_goodput"] = planner_goodput(summary, events, steps)
    return summary


def planner_goodput(summary: dict, events: list[dict], steps: list[dict]) -> float | None:
    """The planner's goodput for a run like this one: its useful time, its measured failure rate,
    restart time, checkpoint interval (in training time) and checkpoint stall."""
    committed = [e for e in events if e.get("event") == "checkpoint"]
    if not committed or summary["useful_s"] <= 0:
        return None
    step_s = statistics.median(r["step_time_s"] for r in steps)
    saved_steps = sorted({e["step"] for e in committed})
    gaps = [b - a for a, b in zip([0] + saved_steps, saved_steps)]
    interval = statistics.median(gaps) * step_s
    delta = summary["checkpoint_stall_s"] / max(1, len(committed))
    failures = summary["failures"]
    restarts = [e["restart_s"] for e in events if e.get("event") == "restart" and e.get("after") == "failure"]
    restart = statistics.mean(restarts) if restarts else 0.0
    mtbi = summary["wall_s"] / failures if failures else NO_FAILURES_MTBI_S
    hour = 3600.0
    expected = expected_run_hours(summary["useful_s"] / hour, interval / hour, delta / hour, restart / hour, mtbi / hour)
    return summary["useful_s"] / hour / expected

"""Goodput of a run, from its events.jsonl and metrics.jsonl, in the planner's terms.

The planner's reliability model (gigatrain/plan/reliability.py) splits a run's wall time into
useful training, work lost since the last checkpoint and re-computed after an interruption,
restarts (detect, start again, load the checkpoint), and checkpoint writes that block
training. A run measures each of these:

- useful_s: the step time of the steps in the final history (each counted once), less skipped updates;
- recomputed_s: the step time of steps that were done, then lost (a crash after them, before
  the next checkpoint; or a rollback), and so done again;
- restart_s: from the last sign of life of the previous process to the end of the next one's
  first step (by phase in the event: docs/fault-tolerance.md, "Where restart time goes"),
  less that step's own training time, which useful_s holds;
- checkpoint_stall_s: the time training waited for checkpoints (the copy, for async saves) and
  for in-memory copies (fault.recovery=memory: `memory_checkpoint` events);
- skipped_s: steps whose update the numerical guard skipped;
- other_s: the rest (start-up, evaluation, logging); the planner's model leaves it out.

goodput = useful_s / wall_s. planner_goodput is the planner's closed form for the run's own
recovery mode (fault.recovery) given this run's own interruption rate, restart times,
checkpoint intervals and stalls, over the same useful time, plus the time the planner's model
leaves out, as measured (other_s and skipped_s: start-up, the end, evaluation).
"""

from __future__ import annotations

import statistics

from gigatrain.plan.reliability import ReliabilityInputs
from gigatrain.rundir import RunDir

# Saves that stall training: storage checkpoints (written or failed) and in-memory copies.
STALL_EVENTS = ("checkpoint", "checkpoint_failed", "memory_checkpoint")

def restart_cost(event: dict) -> float:
    """A restart's seconds besides training: its restart_s runs to the end of the first step,
    whose own step time is counted as useful."""
    return event["restart_s"] - event.get("first_step_time_s", 0.0)


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
    checkpoints = [e for e in events if e.get("event") in STALL_EVENTS and "stall_s" in e]
    failures = [e for e in restarts if e.get("after") == "failure"]
    restart_s = sum(restart_cost(e) for e in restarts)
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
        "memory_checkpoints": sum(1 for e in events if e.get("event") == "memory_checkpoint"),
        "checkpoint_failures": sum(1 for e in events if e.get("event") == "checkpoint_failed"),
        "checkpoint_stall_s": stall_s,
        "skipped_steps": sum(1 for r in steps if r.get("skipped")),
        "skipped_s": skipped,
        "rollbacks": len(rollbacks),
        "other_s": wall - useful - skipped - restart_s - recomputed_s - stall_s,
    }
    summary["planner_goodput"] = planner_goodput(summary, events, steps, (run.read_config() or {}).get("fault", {}))
    return summary


def _mean(values: list[float], default: float) -> float:
    return statistics.mean(values) if values else default


def planner_goodput(summary: dict, events: list[dict], steps: list[dict], fault: dict | None = None) -> float | None:
    """The planner's goodput for a run like this one, in its recovery mode (`fault`: the run's
    fault config; storage when absent): the planner's cost of one failure in that mode, times
    the run's own failures, and its per-step overheads, over the run's useful time; the time the
    model leaves out (other_s, skipped_s: start-up, the end, evaluation) is added as measured.

    The cost of a failure is the closed forms' first-order term (reliability.py): a restart
    plus, on average, half the interval since the last save. Daly's exact form would also charge
    failures striking a restart, which a measured count already holds; conditioned on the count,
    the expectation is the first-order one. Inputs, all measured: the checkpoint interval (median
    gap between committed steps x median step time) and stall per commit; restart_s of each
    failure's restart. memory: copies every fault.memory_every steps (stall: `memory_checkpoint`
    events' stall_s); failures loaded from memory or a peer cost their
    restart and half a copy interval, those loaded from storage theirs and half a checkpoint
    interval. replica (one replica group's run directory, R = fault.replica_groups): its own
    failures cost their restart (the rejoin) and the step in flight; the other groups' failures
    (R - 1 for each of its own: the groups alike) cost it the step in flight and the time the
    Lighthouse takes to see them; the quorum is inside the step time."""
    fault = fault or {}
    committed = [e for e in events if e.get("event") == "checkpoint"]
    if not committed or summary["useful_s"] <= 0:
        return None
    step_s = statistics.median(r["step_time_s"] for r in steps)
    saved_steps = sorted({e["step"] for e in committed})
    gaps = [b - a for a, b in zip([0] + saved_steps, saved_steps)]
    interval = statistics.median(gaps) * step_s
    storage_stalls = [e["stall_s"] for e in events if e.get("event") in ("checkpoint", "checkpoint_failed") and "stall_s" in e]
    delta = sum(storage_stalls) / max(1, len(committed))
    failed = [e for e in events if e.get("event") == "restart" and e.get("after") == "failure"]
    work = summary["useful_s"] * (1 + delta / interval)
    mode = fault.get("recovery", "storage")
    if mode == "memory":
        every = max(1, int(fault.get("memory_every", 1))) * step_s
        copies = [e["stall_s"] for e in events if e.get("event") == "memory_checkpoint" and "stall_s" in e]
        work += summary["useful_s"] * _mean(copies, 0.0) / every
        lost = sum(restart_cost(e) + (every if e.get("loaded_from") in ("memory", "peer") else interval) / 2
                   for e in failed)
    elif mode == "replica" and int(fault.get("replica_groups", 1)) >= 2:
        others = (int(fault["replica_groups"]) - 1) * len(failed)
        lost = sum(restart_cost(e) + step_s for e in failed) + others * (step_s + ReliabilityInputs().replica_detect_s)
    else:
        lost = sum(restart_cost(e) + interval / 2 for e in failed)
    return summary["useful_s"] / (work + lost + summary["other_s"] + summary["skipped_s"])

"""Goodput from events.jsonl and metrics.jsonl, by hand-computed example, and the planner's
closed form applied to a run's own measurements."""

import json

import pytest

from gigatrain.metrics.goodput import summarize
from gigatrain.plan.reliability import expected_run_hours
from gigatrain.rundir import RunDir


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_goodput_accounts_for_restarts_recomputation_stalls_and_skips(tmp_path):
    # 10 steps of 1 s in the final history (step 4 skipped); checkpoints every 5 steps with
    # 0.5 s stalls; a crash after step 7 lost steps 6-7 (2 s) and cost a 4 s restart.
    steps = [{"step": i, "loss": 1.0, "step_time_s": 1.0, "time": 1000.0 + i} for i in range(1, 11)]
    steps[3]["skipped"] = "nan"
    write(RunDir(tmp_path).metrics, steps)
    write(RunDir(tmp_path).events, [
        {"event": "start", "step": 0, "process_start": 990.0, "time": 995.0},
        {"event": "checkpoint", "step": 5, "stall_s": 0.5, "time": 1005.5},
        {"event": "restart", "step": 5, "after": "failure", "recomputed_steps": 2, "recomputed_s": 2.0,
         "restart_s": 4.0, "time": 1010.0},
        {"event": "checkpoint", "step": 10, "stall_s": 0.5, "time": 1020.0},
        {"event": "stop", "step": 10, "reason": "max_steps", "time": 1025.0},
    ])
    s = summarize(RunDir(tmp_path))
    assert s["wall_s"] == 35.0  # 990 -> 1025
    assert s["useful_s"] == 9.0 and s["skipped_s"] == 1.0 and s["skipped_steps"] == 1
    assert (s["restarts"], s["failures"], s["restart_s"]) == (1, 1, 4.0)
    assert (s["recomputed_steps"], s["recomputed_s"]) == (2, 2.0)
    assert (s["checkpoints"], s["checkpoint_stall_s"]) == (2, 1.0)
    assert s["other_s"] == pytest.approx(35.0 - 9 - 1 - 4 - 2 - 1)
    assert s["goodput"] == pytest.approx(9.0 / 35.0)
    # The planner's model of this run: 9 s of work, a checkpoint every 5 steps of 1 s taking
    # 0.5 s, one failure in 35 s of wall time, 4 s restarts.
    hour = 3600.0
    expected = expected_run_hours(9 / hour, 5 / hour, 0.5 / hour, 4 / hour, 35 / hour)
    assert s["planner_goodput"] == pytest.approx(9 / hour / expected)


def test_continuing_a_finished_run_later_is_not_lost_time(tmp_path):
    steps = [{"step": i, "loss": 1.0, "step_time_s": 1.0, "time": 100.0 + i} for i in range(1, 5)]
    write(RunDir(tmp_path).metrics, steps)
    write(RunDir(tmp_path).events, [
        {"event": "start", "step": 0, "process_start": 100.0, "time": 100.0},
        {"event": "stop", "step": 2, "reason": "max_steps", "time": 102.0},
        {"event": "continue", "step": 2, "idle_s": 5000.0, "time": 5102.0},
        {"event": "start", "step": 2, "process_start": 5102.0, "time": 5102.0},
    ])
    steps[2]["time"], steps[3]["time"] = 5103.0, 5104.0
    write(RunDir(tmp_path).metrics, steps)
    s = summarize(RunDir(tmp_path))
    assert s["wall_s"] == pytest.approx(5104.0 - 100.0 - 5000.0) and s["restarts"] == 0
    assert s["goodput"] == pytest.approx(4.0 / 4.0)


def test_no_events_means_no_goodput(tmp_path):
    write(RunDir(tmp_path).metrics, [{"step": 1, "loss": 1.0, "step_time_s": 1.0, "time": 1.0}])
    assert summarize(RunDir(tmp_path)) is None

"""Goodput from events.jsonl and metrics.jsonl, by hand-computed example, and the planner's
closed form applied to a run's own measurements."""

import json

import pytest

from gigatrain.metrics.goodput import summarize
from gigatrain.plan.reliability import ReliabilityInputs
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
    # The planner's model of this run: 9 s of work plus a 0.5 s write every 5 s of it; one
    # failure costing the 4 s restart and half an interval (2.5 s); start-up, the end and the
    # skipped step (19 s) as measured.
    assert s["planner_goodput"] == pytest.approx(9.0 / (9.0 * 1.1 + 4.0 + 2.5 + 19.0))


def test_planner_goodput_of_the_memory_and_replica_modes(tmp_path):
    """The same run in memory mode (a copy every 2 steps; one restart from memory, one from
    storage) and, as one of 4 replica groups, in replica mode."""
    steps = [{"step": i, "loss": 1.0, "step_time_s": 1.0, "time": 1000.0 + i} for i in range(1, 11)]
    write(RunDir(tmp_path).metrics, steps)
    events = [{"event": "start", "step": 0, "process_start": 990.0, "time": 995.0},
              {"event": "checkpoint", "step": 5, "stall_s": 0.5, "time": 1005.5},
              {"event": "memory_checkpoint", "step": 6, "stall_s": 0.01, "time": 1006.0},
              {"event": "restart", "step": 6, "after": "failure", "recomputed_steps": 1, "recomputed_s": 1.0,
               "restart_s": 2.0, "loaded_from": "memory", "time": 1008.0},
              {"event": "restart", "step": 5, "after": "failure", "recomputed_steps": 2, "recomputed_s": 2.0,
               "restart_s": 6.0, "loaded_from": "storage", "time": 1016.0},
              {"event": "checkpoint", "step": 10, "stall_s": 0.5, "time": 1020.0},
              {"event": "stop", "step": 10, "reason": "max_steps", "time": 1030.0}]
    write(RunDir(tmp_path).events, events)
    (tmp_path / "config.json").write_text(json.dumps({"fault": {"recovery": "memory", "memory_every": 2}}))
    s = summarize(RunDir(tmp_path))
    other = s["other_s"]
    # 10 s of work, a 0.5 s write every 5 s and a 0.01 s copy every 2 s of it; the restart from
    # memory costs 2 s and half a copy interval (1 s), the one from storage 6 s and half a checkpoint interval.
    assert s["planner_goodput"] == pytest.approx(10.0 / (10.0 * 1.1 + 10.0 * 0.005 + 3.0 + 8.5 + other))
    (tmp_path / "config.json").write_text(json.dumps({"fault": {"recovery": "replica", "replica_groups": 4}}))
    s = summarize(RunDir(tmp_path))
    # Its own 2 failures: their restarts and the step in flight; the others' 6: a step and the detection.
    detect = ReliabilityInputs().replica_detect_s
    assert s["planner_goodput"] == pytest.approx(10.0 / (10.0 * 1.1 + (2.0 + 1.0) + (6.0 + 1.0) + 6 * (1.0 + detect) + other))


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

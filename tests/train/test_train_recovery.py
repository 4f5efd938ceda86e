"""Recovery alone: what an interruption cost, from the records an earlier process left.
(Rollbacks under injected faults: tests/fault/test_recovery.py.)"""

import time

import pytest

from gigatrain.config import FaultConfig
from gigatrain.rundir import RunDir
from gigatrain.train.recovery import PHASES, Recovery, StartPhases, previous_segment


def steps(*numbers, step_time_s=0.5):
    return [{"step": n, "loss": 2.0, "step_time_s": step_time_s, "time": 100.0 + n} for n in numbers]


def test_a_new_run_has_no_previous_segment():
    assert previous_segment([], [], 0, started_at=200.0) is None


def test_a_failure_costs_the_steps_after_the_checkpoint_and_the_time_until_the_first_step():
    segment = previous_segment(steps(1, 2, 3, 4, 5), [{"event": "start", "time": 100.0}], 3, started_at=200.0)
    assert segment == {"event": "restart", "step": 3, "after": "failure", "recomputed_steps": 2,
                       "recomputed_s": 1.0, "previous_end": 105.0}


def test_a_preempted_run_restarts_a_finished_one_continues():
    preempted = [{"event": "stop", "reason": "SIGTERM", "time": 110.0}]
    assert previous_segment(steps(1, 2), preempted, 2, started_at=200.0)["after"] == "preemption"
    finished = [{"event": "stop", "reason": "max_steps", "time": 110.0}]
    assert previous_segment(steps(1, 2), finished, 2, started_at=200.0) == {"event": "continue", "step": 2,
                                                                              "idle_s": 90.0}


class Events:
    def __init__(self):
        self.records = []

    def event(self, record):
        self.records.append(record)


def test_the_restart_is_recorded_after_the_first_step_once_with_phases_that_sum_to_it(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.metrics.write_text("".join(f'{{"step": {n}, "loss": 2.0, "step_time_s": 0.5, "time": 1.0}}\n'
                                       for n in (1, 2, 3)))
    phases = StartPhases(process_start=5.0)
    phases.reached_at["imports"] = 6.0
    recovery = Recovery(FaultConfig(), run_dir, phases)
    metrics = Events()
    phases.reached_at["rendezvous"] = 7.5
    phases.reached_at["build"] = 9.0
    recovery.begin(2, metrics, loaded_from="storage")
    phases.reached_at["load"] = 9.25  # begin marks it now; the test sets it to a known time
    assert metrics.records == []  # not yet: the restart lasts until the first step
    recovery.after_step(2.5, metrics)
    first_step_end = time.time()
    recovery.after_step(0.5, metrics)
    recovery.write_start(metrics)
    restart, = metrics.records
    assert restart["event"] == "restart" and restart["recomputed_steps"] == 1 and restart["loaded_from"] == "storage"
    # From the last record (time 1.0) to the first step's end.
    assert restart["restart_s"] == pytest.approx(first_step_end - 1.0, abs=0.1)
    phases = restart["phases"]
    assert list(phases) == list(PHASES) and sum(phases.values()) == pytest.approx(restart["restart_s"])
    # The first step took 2 s more than the earlier steps' 0.5: compilation and first-iteration costs.
    assert {name: phases[name] for name in PHASES[:-1]} == {
        "detect_s": 4.0, "start_s": 0.0, "imports_s": 1.0, "rendezvous_s": 1.5, "build_s": 1.5, "load_s": 0.25,
        "compile_s": 2.0}
    assert "previous_end" not in restart


def test_a_new_runs_startup_is_written_once_its_second_step_shows_a_normal_step(tmp_path):
    phases = StartPhases(process_start=time.time() - 3.0)
    recovery = Recovery(FaultConfig(), RunDir(tmp_path), phases)
    phases.reached("rendezvous")
    phases.reached("build")
    metrics = Events()
    recovery.begin(0, metrics, loaded_from=None)
    time.sleep(0.2)  # the first step
    recovery.after_step(0.2, metrics)
    assert metrics.records == []
    recovery.after_step(0.05, metrics)
    startup, = metrics.records
    assert startup["event"] == "startup" and startup["loaded_from"] is None
    assert set(startup["phases"]) == set(PHASES) - {"detect_s", "start_s"}
    assert startup["phases"]["compile_s"] == pytest.approx(0.15)
    assert sum(startup["phases"].values()) == pytest.approx(startup["startup_s"])
    assert startup["startup_s"] > 3.0


def test_other_ranks_keep_no_account():
    recovery = Recovery(FaultConfig(), None, StartPhases(5.0))
    metrics = Events()
    recovery.begin(0, metrics, loaded_from=None)
    recovery.after_step(0.5, metrics)
    recovery.after_step(0.5, metrics)
    assert recovery.history == ([], []) and metrics.records == []

"""Recovery alone: what an interruption cost, from the records an earlier process left.
(Rollbacks under injected faults: tests/fault/test_recovery.py.)"""

from gigatrain.config import FaultConfig
from gigatrain.rundir import RunDir
from gigatrain.train.recovery import Recovery, previous_segment


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


def test_the_restart_is_recorded_at_the_first_step_once(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.metrics.write_text("".join(f'{{"step": {n}, "loss": 2.0, "step_time_s": 0.5, "time": 1.0}}\n'
                                       for n in (1, 2, 3)))
    recovery = Recovery(FaultConfig(), run_dir, started_at=5.0)
    metrics = Events()
    recovery.begin(2, metrics)
    assert metrics.records == []  # not yet: the restart lasts until the first step
    recovery.first_step(metrics)
    recovery.first_step(metrics)
    restart, = metrics.records
    assert restart["event"] == "restart" and restart["recomputed_steps"] == 1 and restart["restart_s"] > 0
    assert "previous_end" not in restart


def test_other_ranks_keep_no_account():
    recovery = Recovery(FaultConfig(), None, started_at=5.0)
    metrics = Events()
    recovery.begin(0, metrics)
    recovery.first_step(metrics)
    assert recovery.history == ([], []) and metrics.records == []

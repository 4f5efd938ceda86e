"""Stopping alone: the clock of the time limit, and why a run stops after a step."""

import math
import time

import pytest
import torch

from gigatrain.train.stopping import EndCut, RunClock, Stopping, StopSignal


def stopping(time_limit_s=0.0, started_at=None, stop_at_step=0, signal=None):
    clock = RunClock(started_at or time.time(), time_limit_s)
    return Stopping(stop_at_step, signal or StopSignal(), clock, mesh=None, device=torch.device("cpu"))


def test_the_clock_counts_from_the_start_of_the_command():
    assert RunClock(time.time(), 0).deadline == math.inf
    clock = RunClock(1000.0, 60)
    assert clock.deadline == 1060.0 and clock.late()  # long past
    assert not RunClock(time.time(), 60).late(30.0, 20.0) and RunClock(time.time(), 60).late(30.0, 40.0)


def test_time_spent_adds_up_with_training_as_the_rest():
    clock = RunClock(time.time() - 10, 0)
    with clock.timed("evaluation"):
        time.sleep(0.01)
    clock.spent["checkpoints"] = 2.0
    spent = clock.time_spent()
    assert set(spent) == {"total", "training", "startup", "checkpoints", "evaluation", "samples_plots"}
    assert spent["evaluation"] >= 0.01 - 1e-3
    assert spent["training"] == pytest.approx(spent["total"] - 2.0 - spent["evaluation"], abs=0.02)


def test_stop_at_step_is_not_the_step_a_process_resumed_at():
    s = stopping(stop_at_step=6)
    assert s.after_step(5, 0, 0.1, 0.1) is None
    assert s.after_step(6, 0, 0.1, 0.1) == "stop_at_step"
    assert s.after_step(6, 6, 0.1, 0.1) is None


def test_a_signal_comes_first_then_the_time_limit():
    signal = StopSignal()
    s = stopping(time_limit_s=10, signal=signal)
    assert s.after_step(1, 0, next_step_s=1.0, end_reserve_s=2.0) is None
    assert s.after_step(1, 0, next_step_s=1.0, end_reserve_s=9.5) == "time_limit"  # the end would overrun
    signal.received = "SIGTERM"
    assert s.after_step(1, 0, 1.0, 9.5) == "SIGTERM"


def test_the_end_once_cut_stays_cut():
    signal = StopSignal()
    cut = stopping(time_limit_s=10, signal=signal).end_cut()
    assert isinstance(cut, EndCut)
    assert not cut(1.0) and cut.by is None
    assert cut(20.0) and cut.by == "time_limit"
    signal.received = "SIGINT"
    assert cut(0.0) and cut.by == "time_limit"  # the first cause stands

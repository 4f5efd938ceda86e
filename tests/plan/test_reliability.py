"""Goodput: Young/Daly, the closed form, the Monte Carlo, and Llama 3's 54-day failure log."""

import math

import numpy as np
import pytest

from gigatrain.plan.reliability import (LLAMA3_GPUS, ReliabilityInputs, daly_interval, expected_run_hours,
                                        reliability, simulate, simulate_run)

MC_TOLERANCE = 0.01  # the Monte Carlo mean must match the exact expectation within 1%


@pytest.mark.parametrize("work, interval, delta, restart, mtbi", [
    (200.0, 0.5, 0.02, 0.2, 3.0),  # Llama-3-like: short checkpoints, an interruption every 3 hours
    (100.0, 1.3, 0.1, 0.5, 1.0),  # harsh: restarts are half an hour, interruptions hourly, partial last segment
    (50.0, 2.0, 0.05, 0.1, 20.0),  # benign
])
def test_monte_carlo_agrees_with_closed_form(work, interval, delta, restart, mtbi):
    runs = simulate(work, interval, delta, restart, mtbi, samples=4000, seed=1)
    exact = expected_run_hours(work, interval, delta, restart, mtbi)
    assert runs["hours"].mean() == pytest.approx(exact, rel=MC_TOLERANCE)
    # Interruptions are a Poisson process in wall time: E[count] = E[wall] / M (Wald).
    assert runs["interruptions"].mean() == pytest.approx(exact / mtbi, rel=0.03)


def test_closed_form_limits():
    # No failures: work plus one checkpoint per interval.
    assert expected_run_hours(10, 1, 0.01, 0.1, 1e12) == pytest.approx(10 + 10 * 0.01, rel=1e-6)
    # Young (1974) for small delta/M: sqrt(2 delta M); Daly's correction is small then.
    assert daly_interval(0.01, 100) == pytest.approx(math.sqrt(2 * 0.01 * 100), rel=0.02)


def test_llama3_54_day_snapshot():
    """Given Llama 3's failure rates (arXiv:2407.21783, table 5), reproduce its 54-day log in aggregate:
    466 interruptions (419 unexpected, 47 planned) and an effective training time above 90%."""
    inputs = ReliabilityInputs()
    probe = reliability(405_000_000_000, LLAMA3_GPUS, 8, 1000.0, inputs)
    work_in_54_days = 54 * 24 * probe.goodput  # the useful hours that fill a 54-day window
    result = reliability(405_000_000_000, LLAMA3_GPUS, 8, work_in_54_days, inputs)
    assert result.expected_hours == pytest.approx(54 * 24, rel=1e-3)
    assert result.expected_interruptions == pytest.approx(466, rel=0.02)
    assert result.mtbi_hours * 60 == pytest.approx(54 * 24 * 60 / 419, rel=0.01)  # "one every 3 hours"
    assert 0.90 < result.goodput < 0.95
    sim = simulate_run(405_000_000_000, LLAMA3_GPUS, 8, work_in_54_days, inputs, samples=1000, seed=0)
    assert sim["mean_days"] == pytest.approx(54, rel=0.01)
    assert sim["mean_interruptions"] == pytest.approx(466, rel=0.03)
    assert sim["p10_days"] <= sim["p50_days"] <= sim["p90_days"]


def test_more_gpus_interrupt_more_often():
    small = reliability(70_000_000_000, 1024, 8, 100, ReliabilityInputs())
    large = reliability(70_000_000_000, 100_000, 8, 100, ReliabilityInputs())
    assert large.mtbi_hours < small.mtbi_hours / 50
    assert large.goodput < small.goodput
    assert np.isclose(large.checkpoint_gb, 70 * 12)

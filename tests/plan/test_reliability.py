"""Goodput: Young/Daly, the closed form, the Monte Carlo, Llama 3's 54-day failure log, and the
three recovery modes (storage, memory, replica): their closed forms against their Monte Carlos."""

import math

import numpy as np
import pytest

from gigatrain.plan.reliability import (LLAMA3_GPUS, PHASES, SOURCES, Cluster, ReliabilityInputs, daly_interval,
                                        expected_run_hours, memory_expected_hours, recovery_modes,
                                        replica_expected_hours, simulate, simulate_memory, simulate_replica,
                                        simulate_run, storage_mode)

MC_TOLERANCE = 0.01  # the Monte Carlo mean must match the exact expectation within 1%
# memory and replica: the closed forms are first order in the rare storage fallback (exact
# otherwise for memory; linear in the overlapping absences for replica): within 1.5%.
MODE_TOLERANCE = 0.015


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
    cluster = Cluster(405_000_000_000, LLAMA3_GPUS, 8, step_s=5.0)
    probe = storage_mode(cluster, 1000.0, inputs)
    work_in_54_days = 54 * 24 * probe.goodput  # the useful hours that fill a 54-day window
    result = storage_mode(cluster, work_in_54_days, inputs)
    assert result.expected_hours == pytest.approx(54 * 24, rel=1e-3)
    assert result.expected_interruptions == pytest.approx(466, rel=0.02)
    assert result.mtbi_hours * 60 == pytest.approx(54 * 24 * 60 / 419, rel=0.01)  # "one every 3 hours"
    assert result.goodput > 0.90  # "higher than 90%" (sec. 3.3.4): a bound, which the phases' ~5.5-minute restarts meet
    sim = simulate_run(cluster, work_in_54_days, inputs, "storage", samples=1000, seed=0)
    assert sim["mean_days"] == pytest.approx(54, rel=0.01)
    assert sim["mean_interruptions"] == pytest.approx(466, rel=0.03)
    assert sim["p10_days"] <= sim["p50_days"] <= sim["p90_days"]


def test_more_gpus_interrupt_more_often():
    small = storage_mode(Cluster(70_000_000_000, 1024, 8), 100, ReliabilityInputs())
    large = storage_mode(Cluster(70_000_000_000, 100_000, 8), 100, ReliabilityInputs())
    assert large.mtbi_hours < small.mtbi_hours / 50
    assert large.goodput < small.goodput
    assert np.isclose(large.checkpoint_gb, 70 * 12)


def test_restart_is_the_sum_of_its_phases_and_scales_with_the_cluster():
    inputs = ReliabilityInputs()
    assert set(SOURCES) == {f for f in ReliabilityInputs.__dataclass_fields__}  # every input has its source
    small = recovery_modes(Cluster(405_000_000_000, 1024, 8, 2.0, 2), 100, inputs)
    large = recovery_modes(Cluster(405_000_000_000, 102_400, 8, 2.0, 2), 100, inputs)
    for modes in (small, large):
        for rel in modes.values():
            assert list(rel.phases) == list(PHASES) and rel.restart_s == pytest.approx(sum(rel.phases.values()))
    # The rendezvous grows with the GPUs that meet: all of them, or (replica) one group's.
    assert large["storage"].phases["rendezvous_s"] - small["storage"].phases["rendezvous_s"] == pytest.approx(
        inputs.rendezvous_ms_per_gpu / 1000 * (102_400 - 1024))
    assert large["replica"].phases["rendezvous_s"] == pytest.approx(inputs.rendezvous_s + 102_400 / 2 / 1000)
    # Storage load = bytes / storage bandwidth; memory and replica loads are far shorter.
    assert large["storage"].phases["load_s"] == pytest.approx(405e9 * 12 / 2000e9)
    assert large["memory"].phases["load_s"] < large["storage"].phases["load_s"] / 10
    assert large["storage"].goodput < large["memory"].goodput < large["replica"].goodput


@pytest.mark.parametrize("work, tau_m, delta_m, restart_m, tau_s, delta_s, restart_s, mtbi, fallback", [
    (100.0, 0.01, 0.0005, 0.1, 0.5, 0.01, 0.2, 1.0, 0.05),  # frequent failures, some falling back
    (50.0, 0.05, 0.001, 0.05, 1.0, 0.02, 0.15, 3.0, 0.2),  # a fifth of them fall back
])
def test_memory_mode_monte_carlo_agrees_with_closed_form(work, tau_m, delta_m, restart_m, tau_s, delta_s, restart_s,
                                                         mtbi, fallback):
    runs = simulate_memory(work, tau_m, delta_m, restart_m, tau_s, delta_s, restart_s, mtbi, fallback, 0.02,
                           samples=1000, seed=2)
    closed = memory_expected_hours(work, tau_m, delta_m, restart_m, tau_s, delta_s, restart_s, mtbi, fallback, 0.02)
    assert runs["hours"].mean() == pytest.approx(closed, rel=MODE_TOLERANCE)
    # No fallback and no memory level beyond the storage one: the storage model, exactly.
    same = memory_expected_hours(work, tau_s, delta_s, restart_s, tau_s, 0.0, restart_s, mtbi, 0.0)
    assert same == pytest.approx(expected_run_hours(work, tau_s, delta_s, restart_s, mtbi), rel=1e-9)


@pytest.mark.parametrize("groups, rejoin, mtbi, whole", [
    (4, 0.1, 0.5, 0.01),  # a failure every half hour, 6-minute rejoins
    (2, 0.1, 1.0, 0.0),  # two groups: both away at once in 5% of failures (storage fallback)
    (16, 0.05, 0.2, 0.02),
])
def test_replica_mode_monte_carlo_agrees_with_closed_form(groups, rejoin, mtbi, whole):
    step, detect, quorum, tau_s, delta_s, restart_s = 0.001, 0.0003, 0.00001, 0.5, 0.005, 0.15
    from gigatrain.plan.reliability import replica_fallback_share

    fallback = replica_fallback_share(groups, rejoin, mtbi, whole)
    closed = replica_expected_hours(100.0, groups, rejoin, step, detect, quorum, tau_s, delta_s, restart_s, mtbi,
                                    fallback, 0.02)
    runs = simulate_replica(100.0, groups, rejoin, step, detect, quorum, tau_s, delta_s, restart_s, mtbi, whole, 0.02,
                            samples=400, seed=3)
    assert runs["hours"].mean() == pytest.approx(closed, rel=MODE_TOLERANCE)
    assert runs["interruptions"].mean() == pytest.approx(runs["hours"].mean() * (1 / mtbi + 0.02), rel=0.03)


def test_planner_modes_at_100k_gpus_monte_carlo_and_target():
    """Llama 3 405B, 15T tokens, 100,000 H100 (the planner's best layout, replica mode with 64
    groups): every mode's Monte Carlo agrees with its closed form, and the best reaches 95%."""
    cluster = Cluster(405_000_000_000, 98_304, 8, step_s=2.24, dp_replicate=64, scaleout_gbs=50.0)
    modes = recovery_modes(cluster, 556.0)
    for mode, rel in modes.items():
        sim = simulate_run(cluster, 556.0, ReliabilityInputs(), mode, samples=100, seed=0)
        assert sim["mean_days"] == pytest.approx(rel.expected_hours / 24, rel=MODE_TOLERANCE), mode
    assert modes["replica"].goodput >= 0.95 > modes["memory"].goodput > modes["storage"].goodput

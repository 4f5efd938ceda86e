"""Power and cost arithmetic against hand-computed cases."""

import math

import pytest

from gigatrain.plan.catalog import get_accelerator
from gigatrain.plan.power import HOURS_PER_YEAR, CostInputs, power_and_cost, site_power


def test_site_power_by_hand():
    h100 = get_accelerator("h100")
    gpu_mw, it_mw, site_mw = site_power(h100, 16, CostInputs(pue=1.2, network_power_fraction=0.1))
    assert gpu_mw == pytest.approx(16 * 700 / 1e6)
    assert it_mw == pytest.approx(2 * 10200 * 1.1 / 1e6)  # two DGX H100 at max power, plus network
    assert site_mw == pytest.approx(it_mw * 1.2)


def test_lease_build_and_break_even_by_hand():
    h100 = get_accelerator("h100")
    inputs = CostInputs(lease_usd_per_gpu_hour=2.0, capex_usd_per_gpu=40000, network_capex_fraction=0.0,
                        facility_usd_per_mw=0.0, electricity_usd_per_mwh=100.0, ops_fraction_per_year=0.0, pue=1.0,
                        network_power_fraction=0.0, server_life_years=4)
    cost = power_and_cost(h100, 8, 1000, inputs)
    assert cost.cost_lease_usd == pytest.approx(8 * 2.0 * 1000)
    electricity = 10200 / 1e6 * 100.0  # USD per hour for one node
    assert cost.build_running_usd_per_hour == pytest.approx(electricity)
    assert cost.cost_build_usd == pytest.approx(1000 * (8 * 40000 / (4 * HOURS_PER_YEAR) + electricity))
    assert cost.break_even_days == pytest.approx(8 * 40000 / (16 - electricity) / 24)
    assert cost.energy_mwh == pytest.approx(10200 / 1e6 * 1000)


def test_break_even_never_when_running_costs_exceed_the_lease():
    cost = power_and_cost(get_accelerator("h100"), 8, 10, CostInputs(lease_usd_per_gpu_hour=0.01))
    assert math.isinf(cost.break_even_days)

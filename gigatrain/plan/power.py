"""Site power, energy and the cost of a run two ways: leasing GPU-hours, or building the cluster.

Every default below is an input (`gigatrain plan --help` lists the flags) and its source is in
SOURCES, printed by the CLI and tabulated in docs/planner.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from gigatrain.plan.catalog import Accelerator

HOURS_PER_YEAR = 8766  # 365.25 days


@dataclass(frozen=True)
class CostInputs:
    lease_usd_per_gpu_hour: float | None = None  # None: the catalog's figure for the GPU
    capex_usd_per_gpu: float | None = None  # None: the catalog's figure (server share per GPU)
    network_capex_fraction: float = 0.15  # scale-out fabric (switches, optics, cables) over server capex
    facility_usd_per_mw: float = 10e6  # building, power and cooling plant per MW of IT load
    server_life_years: float = 5.0
    facility_life_years: float = 15.0
    electricity_usd_per_mwh: float = 80.0
    pue: float = 1.2  # site power / IT power
    network_power_fraction: float = 0.10  # switches and optics, over the servers' power
    ops_fraction_per_year: float = 0.05  # staff, maintenance, spares: share of server capex per year
    load_factor: float = 1.0  # average draw over nameplate (1.0: bill the provisioned power)


SOURCES = {
    "lease_usd_per_gpu_hour": "hardware catalog, per GPU (public on-demand list prices, 2024-2025; large reservations pay less)",
    "capex_usd_per_gpu": "hardware catalog, per GPU (reported system list prices divided by GPUs per system)",
    "network_capex_fraction": "estimate: the InfiniBand/RoCE fabric is commonly 10-20% of an AI cluster's capex",
    "facility_usd_per_mw": "Cushman & Wakefield Data Center Development Cost Guide 2024: ~$10M per MW in US markets",
    "server_life_years": "hyperscaler depreciation schedules for servers: 5-6 years (Meta 5.5, Microsoft and Alphabet 6, 2024-2025 filings)",
    "facility_life_years": "estimate: data-center shells and plant depreciate over 15-20+ years",
    "electricity_usd_per_mwh": "US EIA Electric Power Monthly 2024: industrial average ~8 cents/kWh",
    "pue": "new liquid-cooled AI halls run ~1.1-1.3 (Google fleet 1.10, 2023); Uptime Institute 2024 survey average 1.56",
    "network_power_fraction": "estimate: a 3-tier fat tree for 100k GPUs has ~8k 64-port switches (~1 kW) and ~5 transceivers per GPU (~15 W each)",
    "ops_fraction_per_year": "estimate: staff, repairs and spares",
    "load_factor": "1.0 bills nameplate power; measured training draws ~70-90% of it",
}


@dataclass
class PowerCost:
    gpu_power_mw: float  # GPU boards at TDP
    it_power_mw: float  # servers at their max power plus the network
    site_power_mw: float  # IT power times PUE: what the site must provision
    hours: float
    energy_mwh: float
    lease_usd_per_hour: float
    build_capex_usd: float  # servers, network and facility, paid up front
    build_running_usd_per_hour: float  # electricity and operations
    build_amortised_usd_per_hour: float  # capex spread over the lives, plus running costs
    cost_lease_usd: float
    cost_build_usd: float
    break_even_days: float  # use beyond which building beats leasing (inf: never)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def site_power(gpu: Accelerator, gpus: int, inputs: CostInputs = CostInputs()) -> tuple[float, float, float]:
    """(GPU MW, IT MW, site MW) of a fleet: whole nodes at their max power, plus the network, times PUE."""
    nodes = math.ceil(gpus / gpu.gpus_per_node)
    it_watts = nodes * gpu.node_power_w * (1 + inputs.network_power_fraction)
    return gpus * gpu.tdp_w / 1e6, it_watts / 1e6, it_watts * inputs.pue / 1e6


def power_and_cost(gpu: Accelerator, gpus: int, hours: float, inputs: CostInputs = CostInputs()) -> PowerCost:
    """Power, energy and cost of holding `gpus` GPUs for `hours`, leased or built."""
    gpu_mw, it_mw, site_mw = site_power(gpu, gpus, inputs)
    lease_price = inputs.lease_usd_per_gpu_hour if inputs.lease_usd_per_gpu_hour is not None else gpu.lease_usd_per_gpu_hour
    capex_per_gpu = inputs.capex_usd_per_gpu if inputs.capex_usd_per_gpu is not None else gpu.capex_usd_per_gpu
    server_capex = gpus * capex_per_gpu * (1 + inputs.network_capex_fraction)
    facility_capex = inputs.facility_usd_per_mw * it_mw
    electricity_per_hour = site_mw * inputs.load_factor * inputs.electricity_usd_per_mwh
    running_per_hour = electricity_per_hour + inputs.ops_fraction_per_year * server_capex / HOURS_PER_YEAR
    amortised_per_hour = (server_capex / (inputs.server_life_years * HOURS_PER_YEAR)
                          + facility_capex / (inputs.facility_life_years * HOURS_PER_YEAR) + running_per_hour)
    lease_per_hour = gpus * lease_price
    # Building costs its capex up front and then only running costs; leasing costs by the hour.
    saving_per_hour = lease_per_hour - running_per_hour
    break_even_hours = (server_capex + facility_capex) / saving_per_hour if saving_per_hour > 0 else math.inf
    return PowerCost(
        gpu_power_mw=gpu_mw, it_power_mw=it_mw, site_power_mw=site_mw, hours=hours,
        energy_mwh=site_mw * inputs.load_factor * hours,
        lease_usd_per_hour=lease_per_hour, build_capex_usd=server_capex + facility_capex,
        build_running_usd_per_hour=running_per_hour, build_amortised_usd_per_hour=amortised_per_hour,
        cost_lease_usd=lease_per_hour * hours, cost_build_usd=amortised_per_hour * hours,
        break_even_days=break_even_hours / 24,
    )

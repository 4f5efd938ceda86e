"""Rich terminal tables for a plan, a sweep, a calibration and the published-run comparison."""

from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.table import Table

from gigatrain.plan.units import human

MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "buffers")
TIME_PARTS = ("compute", "tp_comm", "cp_comm", "ep_comm", "dp_comm", "pp_comm", "bubble", "optimizer")


def make_console() -> Console:
    """A terminal's own width; 140 columns when piped (rich would wrap the tables at 80)."""
    return Console() if sys.stdout.isatty() else Console(width=140)


def usd(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"${human(value)}"


def days_text(days: float) -> str:
    return f"{days:,.1f}" if days >= 10 else f"{days:.3g}"


def duration(days: float) -> str:
    if not math.isfinite(days):
        return "never"
    return f"{days:,.1f} days" if days < 730 else f"{days / 365.25:,.1f} years"


def print_plan(plan: dict, console: Console | None = None) -> None:
    console = console or make_console()
    best = plan["best"]
    params = human(plan["params_total"])
    if plan["params_active"] != plan["params_total"]:  # mixture of experts: MFU and FLOPs count the active ones
        params += f" total, {human(plan['params_active'])} active"
    console.print(f"[bold]gigatrain plan[/]: {plan['model']} ({params} parameters), "
                  f"{human(plan['tokens'])} tokens, {plan['gpus']:,} x {plan['gpu']} ({plan['gpu_description']}), "
                  f"sequence {plan['seq_len']:,}, batch {plan['global_batch']:,} sequences "
                  f"({human(plan['tokens_per_step'])} tokens), {plan['precision']}")

    ranked = Table(title="Layouts ranked by step time", title_justify="left")
    for name in ("#", "layout", "GPUs", "µbatches", "step s", "MFU", "tokens/s", "days", "GB/GPU"):
        ranked.add_column(name, justify="left" if name == "layout" else "right", no_wrap=name != "layout")
    for i, row in enumerate(plan["layouts"], 1):
        ranked.add_row(str(i), row["layout"], f"{row['gpus_used']:,}", str(row["microbatches"]),
                       f"{row['step_time_s']:.3g}", f"{row['mfu']:.1%}", human(row["tokens_per_s"]),
                       days_text(row["days"]), f"{row['memory_total_gb']:.1f}")
    console.print(ranked)

    memory = Table(title=f"Memory per GPU, GB (of {plan['gpu_memory_gb']:g})", title_justify="left")
    # The ep column (MoE all-to-all) only where some layout has expert parallelism.
    time_parts = [k for k in TIME_PARTS if k != "ep_comm" or any(row["ep"] > 1 for row in plan["layouts"])]
    axes = ", ".join(k.replace("_comm", "") for k in time_parts if k.endswith("_comm"))
    time = Table(title=f"Time per step, s ({axes}: exposed communication by axis)", title_justify="left")
    memory.add_column("#")
    time.add_column("#")
    for name in MEMORY_PARTS + ("total",):
        memory.add_column(name, justify="right")
    for name in time_parts + ["total"]:
        time.add_column(name.replace("_comm", "").replace("optimizer", "optim"), justify="right")
    for i, row in enumerate(plan["layouts"], 1):
        memory.add_row(str(i), *[f"{row['memory_gb'][k]:.1f}" for k in MEMORY_PARTS], f"{row['memory_total_gb']:.1f}")
        time.add_row(str(i), *[f"{row['time_s'][k]:.3f}" for k in time_parts], f"{row['step_time_s']:.3f}")
    console.print(memory)
    console.print(time)

    console.print(f"[bold]Best layout[/]: {best['layout']}: MFU {best['mfu']:.1%}, {human(best['tokens_per_s'])} tokens/s, "
                  f"{days_text(best['days'])} days of training, {days_text(best['days_expected'])} days with failures "
                  f"(goodput {best['goodput']:.1%}, recovery from {best['recovery_mode']})")
    print_power(plan, console)
    print_reliability(plan, console)


def print_quantities(title: str, rows: list[tuple[str, str]], console: Console) -> None:
    """A two-column table of named quantities and their formatted values."""
    table = Table(title=title, title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def print_power(plan: dict, console: Console) -> None:
    power, best = plan["power"], plan["best"]
    rows = [
        ("GPU power at TDP", f"{power['gpu_power_mw']:,.1f} MW"),
        ("IT power (servers + network)", f"{power['it_power_mw']:,.1f} MW"),
        ("site power (x PUE)", f"{power['site_power_mw']:,.1f} MW"),
        ("energy", f"{power['energy_mwh']:,.0f} MWh"),
        ("lease: cost of the run", f"{usd(power['cost_lease_usd'])} ({usd(power['lease_usd_per_hour'])}/hour)"),
        ("build: capex (servers, network, facility)", usd(power["build_capex_usd"])),
        ("build: cost of the run (amortised + running)", f"{usd(power['cost_build_usd'])} "
                                                          f"({usd(power['build_amortised_usd_per_hour'])}/hour)"),
        ("break-even: building beats leasing after", duration(power["break_even_days"])),
    ]
    title = f"Power and cost of the fleet ({plan['gpus']:,} GPUs) over {days_text(best['days_expected'])} days"
    print_quantities(title, rows, console)


def print_reliability(plan: dict, console: Console) -> None:
    modes = plan["recovery"]
    first = next(iter(modes.values()))
    console.print(f"[bold]Failures[/]: an interruption every {first['mtbi_hours'] * 60:,.1f} min; checkpoint "
                  f"{first['checkpoint_gb']:,.0f} GB, written in {modes['storage']['checkpoint_write_s']:,.1f} s")
    table = Table(title="Recovery modes of the best layout (fault.recovery; docs/fault-tolerance.md)", title_justify="left")
    for name in ("mode", "restart", "in-memory copy", "storage checkpoint", "falls back to storage", "goodput", "days"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    for mode, rel in modes.items():
        copy = f"every {rel['memory_interval_s']:,.1f} s" if mode == "memory" else ""
        table.add_row(mode + (" (best)" if mode == plan["recovery_mode"] else ""), f"{rel['restart_s'] / 60:,.1f} min", copy,
                      f"every {rel['checkpoint_interval_s'] / 60:,.1f} min", f"{rel['fallback_per_failure']:.2%}",
                      f"{rel['goodput']:.1%}", days_text(rel["days_expected"]))
    console.print(table)
    phases = Table(title="Restart phases, s", title_justify="left")
    phases.add_column("phase")
    for mode in modes:
        phases.add_column(mode, justify="right")
    for key in next(iter(modes.values()))["phases"]:
        phases.add_row(key.removesuffix("_s"), *[f"{rel['phases'][key]:,.2f}" for rel in modes.values()])
    console.print(phases)
    if "memory" in modes:
        console.print(f"memory: a copy stalls training {modes['memory']['memory_stall_s'] * 1000:,.0f} ms")
    if "replica" in modes:
        replica = modes["replica"]
        console.print(f"replica: {replica['replica_groups']} replica groups ({replica['layout']}); a failure takes one "
                      f"away for its restart, the others train on; quorum {replica['quorum_s'] * 1000:g} ms per step")
    for mode, sim in plan.get("simulation", {}).items():
        console.print(f"Monte Carlo, {mode} ({sim['samples']:,} runs): p10 / p50 / p90 {sim['p10_days']:,.2f} / "
                      f"{sim['p50_days']:,.2f} / {sim['p90_days']:,.2f} days; mean {sim['mean_days']:,.2f} vs closed "
                      f"form {sim['closed_form_days']:,.2f} days")


def print_sweep(sweep: dict, console: Console | None = None) -> None:
    console = console or make_console()
    table = Table(title=f"Sweep over {sweep['key']}", title_justify="left")
    for name in (sweep["key"], "best layout", "GPUs used", "MFU", "days", "days w/ failures", "site MW", "lease $", "build $"):
        table.add_column(name, justify="left" if name == "best layout" else "right")
    for row in sweep["rows"]:
        best = row.get("best")
        if best is None:
            table.add_row(str(row["value"]), f"[red]{row['error']}[/]", *[""] * 7)
            continue
        table.add_row(str(row["value"]), best["layout"], f"{best['gpus_used']:,}", f"{best['mfu']:.1%}",
                      days_text(best["days"]), days_text(best["days_expected"]), f"{best['power_mw']:,.1f}",
                      usd(best["cost_lease_usd"]), usd(best["cost_build_usd"]))
    console.print(table)
    if sweep.get("plot"):
        console.print(f"plot written to {sweep['plot']}")


def print_calibration(report: dict, console: Console | None = None) -> None:
    console = console or make_console()
    table = Table(title="Calibration: measured vs predicted step time", title_justify="left")
    for name in ("run", "layout", "measured s", "before s", "err", "after s", "err", "held-out s", "err"):
        table.add_column(name, justify="left" if name in ("run", "layout") else "right")
    for row in report["runs"]:
        measured = row["measured_step_s"]
        cells = [row["run"], row["layout"], f"{measured:.4g}"]
        for key in ("predicted_before_s", "predicted_after_s", "predicted_held_out_s"):
            cells += [f"{row[key]:.4g}", f"{row[key] / measured - 1:+.1%}"]
        table.add_row(*cells)
    console.print(table)
    worst = report["max_abs_error"]
    console.print(f"largest error: before {worst['before']:.1%}, after {worst['after']:.1%}, "
                  f"held out (leave-one-out) {worst['held_out']:.1%}")
    console.print("fitted factors: " + ", ".join(f"{k}={v:.4g}" for k, v in report["efficiency"].items()))
    if report.get("saved"):
        console.print(f"saved to {report['saved']}; use it with gigatrain plan --efficiency {report['saved']}")


def print_published(rows: list[dict], console: Console | None = None) -> None:
    console = console or make_console()
    table = Table(title="Published runs: reported vs predicted", title_justify="left")
    for name in ("run", "metric", "published", "predicted", "error", "planner's free choices"):
        table.add_column(name, justify="left" if name in ("run", "metric", "planner's free choices") else "right")
    for row in rows:
        fmt = "{:.1%}" if row["metric"] == "mfu" else "{:.0f}"
        error = f"{row['error']:+.1%}" + (" (known miss)" if row["known_miss"] else "")
        table.add_row(row["run"], row["metric"], fmt.format(row["published"]), fmt.format(row["predicted"]), error,
                      row["layout"])
    console.print(table)


def print_sources(sources: dict[str, dict[str, str]], console: Console | None = None) -> None:
    console = console or make_console()
    for section, entries in sources.items():
        table = Table(title=section, title_justify="left")
        table.add_column("input")
        table.add_column("default")
        table.add_column("source")
        for name, (default, source) in entries.items():
            table.add_row(name, f"{default:.6g}" if isinstance(default, float) else str(default), source)
        console.print(table)

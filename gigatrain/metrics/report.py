"""`gigatrain report RUN_DIR`: a summary table and the run's plots, redrawn."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table

from gigatrain.config import ConfigError
from gigatrain.metrics.goodput import summarize as goodput_summary
from gigatrain.metrics.plots import plot_run
from gigatrain.rundir import RunDir


def summarize(run: RunDir) -> dict:
    records = run.metrics_records()
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("val_loss") is not None]
    if not steps:
        raise ConfigError(f"{run.path} has no training steps in {run.metrics.name}; pass the run.dir of a training run")
    # Skip the first steps of the run: they include warm-up (allocation, compile).
    steady = steps[min(len(steps) - 1, max(1, len(steps) // 10)):]
    summary = {
        "steps": steps[-1]["step"],
        "final_loss": steps[-1]["loss"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "train_time_s": sum(r["step_time_s"] for r in steps),
    }
    for key in ("expert_load_max", "aux_loss"):  # mixture-of-experts runs: the last step's balance
        if key in steps[-1]:
            summary[key] = steps[-1][key]
    goodput = goodput_summary(run)
    if goodput is not None:  # runs from before events.jsonl have none
        summary.update(goodput)
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        summary.update({"val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"],
                        "best_val_bpb": best["val_bpb"], "best_val_step": best["step"]})
    info = run.read_run_info()
    if info is not None:
        summary.update({"device": info.get("device_name"), "n_params": info.get("n_params"), "git_sha": info.get("git_sha")})
    return summary


def start_phases(events: list[dict]) -> dict | None:
    """Where the run's starts went (the `phases` of its `restart` and `startup` events): each
    phase's median over the restarts, their count and where they loaded their state from, and
    the first start's phases. None: no start recorded its phases (a run from before they were)."""
    restarts = [e for e in events if e.get("event") == "restart" and "phases" in e]
    startup = next((e for e in events if e.get("event") == "startup"), None)
    if not restarts and startup is None:
        return None
    summary: dict = {"restarts": len(restarts)}
    if restarts:
        names = list(restarts[0]["phases"])
        summary["restart_phases"] = {name: statistics.median(e["phases"].get(name, 0.0) for e in restarts)
                                     for name in names}
        summary["restart_s"] = statistics.median(e["restart_s"] for e in restarts)
        sources = [str(e.get("loaded_from")) for e in restarts]
        summary["loaded_from"] = {source: sources.count(source) for source in dict.fromkeys(sources)}
    if startup is not None:
        summary["startup_phases"], summary["startup_s"] = startup["phases"], startup["startup_s"]
    return summary


def phase_table(phases: dict) -> Table:
    """The restarts' median phases beside the first start's."""
    n = phases["restarts"]
    restart, startup = phases.get("restart_phases", {}), phases.get("startup_phases", {})
    table = Table(title="where start-up time goes (s)")
    table.add_column("phase")
    table.add_column(f"restart, median of {n}", justify="right")
    table.add_column("first start", justify="right")
    for name in dict.fromkeys([*restart, *startup]):
        table.add_row(name.removesuffix("_s"), f"{restart[name]:.2f}" if name in restart else "-",
                      f"{startup[name]:.2f}" if name in startup else "-")
    table.add_row("total", f"{phases['restart_s']:.2f}" if restart else "-",
                  f"{phases['startup_s']:.2f}" if startup else "-")
    return table


def report(run: RunDir) -> dict:
    if not run.path.is_dir():
        raise ConfigError(f"run directory {run.path} does not exist")
    summary = summarize(run)
    plots = plot_run(run)
    table = Table(title=f"run {run.path}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    phases = start_phases(run.event_records())
    if phases is not None:
        console.print(phase_table(phases))
        if phases["restarts"]:
            console.print("restarts loaded their state from: "
                          + ", ".join(f"{source} ({count})" for source, count in phases["loaded_from"].items()))
        summary["start_phases"] = phases
    console.print("plots: " + ", ".join(str(p) for p in plots))
    return summary

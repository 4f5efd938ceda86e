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
    console.print("plots: " + ", ".join(str(p) for p in plots))
    return summary

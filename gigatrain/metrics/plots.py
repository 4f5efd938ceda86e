"""PNG plots of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from gigatrain.rundir import RunDir  # noqa: E402


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run: RunDir) -> list[Path]:
    """Draw loss.png and throughput.png into the run directory, and expert_load.png for a
    mixture-of-experts run; returns their paths."""
    records = run.metrics_records()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps, loss = _series(records, "loss")
    ax.plot(steps, loss, lw=0.8, alpha=0.8, label="train loss")
    val_steps, val_loss = _series(records, "val_loss")
    if val_steps:
        ax.plot(val_steps, val_loss, "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run.path.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.loss_plot, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps, tokens_per_s = _series(records, "tokens_per_s")
    ax.plot(steps, tokens_per_s, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{run.path.name}: throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.throughput_plot, dpi=120)
    plt.close(fig)
    plots = [run.loss_plot, run.throughput_plot]
    if any("expert_load" in r for r in records):
        plots.append(_plot_expert_load(run, records))
    return plots


def _plot_expert_load(run: RunDir, records: list[dict]) -> Path:
    """Each MoE layer's load over training: its busiest expert's tokens over the mean (1.0 is
    perfect balance; n_experts / top_k, every token on the same k experts, the worst)."""
    steps, loads = _series(records, "expert_load")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, layer_load in enumerate(zip(*loads)):
        ax.plot(steps, layer_load, lw=0.8, label=f"MoE layer {index}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("busiest expert's load / mean load")
    ax.set_title(f"{run.path.name}: expert load")
    ax.grid(alpha=0.3)
    if loads and len(loads[0]) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(run.expert_load_plot, dpi=120)
    plt.close(fig)
    return run.expert_load_plot

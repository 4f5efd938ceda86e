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
    """Draw loss.png and throughput.png into the run directory; returns their paths."""
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
    return [run.loss_plot, run.throughput_plot]

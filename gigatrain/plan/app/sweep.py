"""`gigatrain plan ... --sweep KEY=V1,V2,...`: one plan per value, a table and a PNG."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gigatrain.plan.catalog import Accelerator, get_accelerator
from gigatrain.plan.layout import NoLayoutError
from gigatrain.plan.planner import PlanSpec, make_plan
from gigatrain.plan.units import parse_count, parse_int_count

SWEEP_KEYS = ("gpus", "gpu", "batch", "seq", "tokens")


class SweepError(ValueError):
    """A sweep spec that cannot be read; the message is one line for the user."""


def parse_sweep(text: str, catalog: dict[str, Accelerator]) -> tuple[str, list]:
    """'gpus=8k,16k,32k' -> ('gpus', [8000, 16000, 32000]); 'gpu=h100,b200' -> ('gpu', [...names])."""
    key, sep, values = text.partition("=")
    key = key.strip().lower()
    if not sep or key not in SWEEP_KEYS or not values.strip():
        raise SweepError(f"cannot read sweep {text!r}; write KEY=V1,V2,... with KEY one of: {', '.join(SWEEP_KEYS)} "
                         f"(e.g. --sweep gpus=8k,16k,32k,100k)")
    items = [v.strip() for v in values.split(",") if v.strip()]
    try:
        if key == "gpu":
            return key, [get_accelerator(v, catalog).name for v in items]
        if key == "tokens":
            return key, [parse_count(v, "tokens") for v in items]
        return key, [parse_int_count(v, key) for v in items]
    except ValueError as err:
        raise SweepError(f"sweep {key}: {err}") from None


def spec_for(spec: PlanSpec, key: str, value, catalog: dict[str, Accelerator]) -> PlanSpec:
    if key == "gpus":
        return replace(spec, gpus=value)
    if key == "gpu":
        return replace(spec, gpu=catalog[value])
    if key == "tokens":
        return replace(spec, tokens=value)
    if key == "seq":  # keep the tokens per step: the batch in sequences follows the sequence length
        return replace(spec, seq_len=value, global_batch=max(1, round(spec.global_batch * spec.seq_len / value)))
    return replace(spec, global_batch=max(1, round(value / spec.seq_len)))  # batch, in tokens


def run_sweep(spec: PlanSpec, key: str, values: list, catalog: dict[str, Accelerator], plot: str | None) -> dict:
    rows = []
    for value in values:
        try:
            plan = make_plan(replace(spec_for(spec, key, value, catalog), top=1, simulate=0))
            rows.append({"value": value, "best": plan["best"], "plan": plan})
        except NoLayoutError as err:
            rows.append({"value": value, "best": None, "error": str(err)})
    sweep = {"key": key, "rows": [{k: v for k, v in row.items() if k != "plan"} for row in rows]}
    if plot:
        sweep["plot"] = draw(sweep, plot)
    return sweep


def draw(sweep: dict, path: str) -> str:
    """Days to train, site MW and cost against the swept value, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = sweep["key"]
    rows = [row for row in sweep["rows"] if row["best"] is not None]
    labels = [str(row["value"]) for row in rows]
    numeric = key in ("gpus", "batch", "seq", "tokens")
    x = [row["value"] for row in rows] if numeric else list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("days to train", [(r["best"]["days"], "no failures") for r in rows],
         [(r["best"]["days_expected"], "with failures") for r in rows]),
        ("site power, MW", [(r["best"]["power_mw"], "site (PUE included)") for r in rows], None),
        ("cost of the run, $M", [(r["best"]["cost_lease_usd"] / 1e6, "lease") for r in rows],
         [(r["best"]["cost_build_usd"] / 1e6, "build (amortised)") for r in rows]),
    ]
    for ax, (title, first, second) in zip(axes, panels):
        for series in (first, second):
            if series:
                ax.plot(x, [v for v, _ in series], marker="o", label=series[0][1])
        ax.set_title(title)
        ax.set_xlabel(key)
        if numeric:
            ax.set_xscale("log")
        else:
            ax.set_xticks(x, labels)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"gigatrain plan: sweep over {key}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

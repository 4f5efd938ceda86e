"""Fit the model's efficiency factors to measured runs (`gigatrain plan --calibrate RUN_DIR...`).

A run directory (read through gigatrain.rundir.RunDir) holds run.json (the layout the trainer
resolved, device, model shape, peak FLOP/s), config.json (the dtype) and metrics.jsonl (one line
per optimizer step with step_time_s). The measured step
time of a run is the median after its warm-up steps. The fit minimises the mean squared log
error of predicted against measured step times (so a 10% miss counts the same on a 0.1 s and a
10 s step) by Nelder-Mead over the logs of the factors, and reports errors before and after,
plus leave-one-out errors: each run predicted by factors fitted without it.
"""

from __future__ import annotations

import math
import statistics
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from gigatrain.config import ConfigError
from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import Accelerator, accelerator_for_device, get_accelerator
from gigatrain.plan.costs import Efficiency, Layout, Workload, estimate
from gigatrain.rundir import RunDir

WARMUP_FRACTION = 0.2  # skip the first fifth of the steps (at least 2): allocator and thread-pool warm-up
COMPUTE_FACTORS = ("matmul", "elementwise_passes", "layer_overhead_s", "step_overhead_s")
COMM_FACTORS = ("collective_scaleup", "collective_scaleout", "overlap")
BOUNDS = {"matmul": (1e-3, 1.0), "elementwise_passes": (0.1, 2000.0), "layer_overhead_s": (1e-7, 10.0),
          "step_overhead_s": (1e-7, 100.0), "collective_scaleup": (0.05, 1.0), "collective_scaleout": (0.05, 1.0),
          "overlap": (0.01, 1.0)}


class CalibrationError(ValueError):
    """A run directory that cannot be read; the message is one line for the user."""


@dataclass
class MeasuredRun:
    name: str
    workload: Workload
    layout: Layout
    gpu: Accelerator
    step_time_s: float  # median after warm-up
    steps: int


def measured_step_time(run: RunDir) -> tuple[float, int]:
    """Median step time after warm-up, and the number of steps it is taken over."""
    if not run.metrics.is_file():
        raise CalibrationError(f"{run.metrics} does not exist; the run has no metrics yet")
    times = {}
    for record in run.metrics_records():  # a line torn by a crash is skipped
        if "step_time_s" in record and "step" in record:
            times[int(record["step"])] = float(record["step_time_s"])  # a resumed run rewrites steps
    ordered = [times[step] for step in sorted(times)]
    skip = max(2, int(len(ordered) * WARMUP_FRACTION))
    kept = ordered[skip:]
    if len(kept) < 3:
        raise CalibrationError(f"{run.metrics} has {len(ordered)} steps; calibration needs at least {skip + 3}")
    return statistics.median(kept), len(kept)


def read_run(run_dir: str | Path) -> MeasuredRun:
    """A run as it was trained: the layout the trainer resolved (run.json's "layout", in the
    planner's names), its device and model shape, and its measured step time."""
    run = RunDir(run_dir)
    try:
        info, config = run.read_run_info(), run.read_config() or {}
    except ConfigError as err:
        raise CalibrationError(str(err)) from None
    if info is None:
        raise CalibrationError(f"{run.run_info} does not exist; pass run directories written by `gigatrain train`")
    resolved = info.get("layout", {})
    # ep is recorded by MoE runs only: a dense run's layout has no expert-parallel degree (1).
    layout_names = [f.name for f in fields(Layout) if f.name != "ep"]
    missing = [name for name in layout_names + ["global_batch"] if name not in resolved]
    if missing:
        raise CalibrationError(f"{run.run_info} does not record the resolved layout ({', '.join(missing)} missing); "
                               f"pass runs trained by this version of gigatrain")
    layout = Layout(**{name: resolved[name] for name in layout_names}, ep=int(resolved.get("ep", 1)))
    args_fields = {f for f in ModelArgs.__dataclass_fields__}
    model = ModelArgs(**{k: v for k, v in info["model_args"].items() if k in args_fields})
    dtype = config.get("train", {}).get("dtype", "auto")
    cpu = info.get("device", "cpu") == "cpu"
    fp32 = dtype == "float32" or (cpu and dtype == "auto")
    gpu = get_accelerator("cpu") if cpu else accelerator_for_device(info.get("device_name", ""))
    if info.get("peak_flops"):  # the denominator the run itself measured or looked up
        gpu = replace(gpu, peak_bf16_tflops=float(info["peak_flops"]) / 1e12, peak_fp8_tflops=0.0)
    workload = Workload(model, int(info["seq_len"]), int(resolved["global_batch"]), act_bytes=4 if fp32 else 2)
    step_time, steps = measured_step_time(run)
    return MeasuredRun(run.path.name, workload, layout, gpu, step_time, steps)


def predict(run: MeasuredRun, efficiency: Efficiency) -> float:
    return estimate(run.workload, run.layout, run.gpu, efficiency).step_time_s


def _log_errors(runs: list[MeasuredRun], efficiency: Efficiency) -> np.ndarray:
    return np.array([math.log(predict(run, efficiency) / run.step_time_s) for run in runs])


def nelder_mead(objective, start: np.ndarray, step: float = 0.7, iterations: int = 600, tol: float = 1e-10) -> np.ndarray:
    """Minimise objective(x) from start (standard reflection/expansion/contraction/shrink)."""
    simplex = [start] + [start + step * np.eye(len(start))[i] for i in range(len(start))]
    values = [objective(x) for x in simplex]
    for _ in range(iterations):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if abs(values[-1] - values[0]) < tol:
            break
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        f_reflected = objective(reflected)
        if f_reflected < values[0]:
            expanded = centroid + 2 * (centroid - simplex[-1])
            f_expanded = objective(expanded)
            simplex[-1], values[-1] = (expanded, f_expanded) if f_expanded < f_reflected else (reflected, f_reflected)
        elif f_reflected < values[-2]:
            simplex[-1], values[-1] = reflected, f_reflected
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            f_contracted = objective(contracted)
            if f_contracted < values[-1]:
                simplex[-1], values[-1] = contracted, f_contracted
            else:
                simplex = [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex]
                values = [objective(x) for x in simplex]
    return simplex[int(np.argmin(values))]


def _with_factors(base: Efficiency, names: tuple[str, ...], logs: np.ndarray, attention_ratio: float) -> Efficiency:
    values = {name: float(np.clip(math.exp(x), *BOUNDS[name])) for name, x in zip(names, logs)}
    if "matmul" in values:  # attention kernels speed up and slow down with the GEMMs
        values["attention"] = values["matmul"] * attention_ratio
    return replace(base, **values)


def fit(runs: list[MeasuredRun], base: Efficiency = Efficiency()) -> Efficiency:
    """Factors that minimise the mean squared log error over the runs. Communication factors are
    fitted only when some run spans more than one device (otherwise nothing measures them)."""
    names = COMPUTE_FACTORS + (COMM_FACTORS if any(r.layout.world_size > 1 for r in runs) else ())
    resolved = base.resolve(runs[0].gpu)
    attention_ratio = resolved.attention / resolved.matmul
    start_values = {**resolved.to_dict(), "layer_overhead_s": max(resolved.layer_overhead_s, 1e-4),
                    "step_overhead_s": max(resolved.step_overhead_s, 1e-3)}
    start = np.log([start_values[name] for name in names])

    def objective(logs: np.ndarray) -> float:
        return float(np.mean(_log_errors(runs, _with_factors(base, names, logs, attention_ratio)) ** 2))

    best = nelder_mead(objective, start)
    best = nelder_mead(objective, best, step=0.3)  # restart from the optimum: Nelder-Mead stalls otherwise
    return _with_factors(base, names, best, attention_ratio)


@dataclass
class CalibrationReport:
    runs: list[MeasuredRun]
    before: Efficiency
    after: Efficiency
    predicted_before: list[float]
    predicted_after: list[float]
    predicted_held_out: list[float]  # leave-one-out

    @staticmethod
    def _errors(runs, predictions) -> list[float]:
        return [p / r.step_time_s - 1 for r, p in zip(runs, predictions)]

    def errors(self, which: str) -> list[float]:
        return self._errors(self.runs, getattr(self, f"predicted_{which}"))

    def to_dict(self) -> dict:
        rows = []
        for i, run in enumerate(self.runs):
            rows.append({"run": run.name, "layout": run.layout.describe(), "measured_step_s": run.step_time_s,
                         "steps": run.steps, "predicted_before_s": self.predicted_before[i],
                         "predicted_after_s": self.predicted_after[i], "predicted_held_out_s": self.predicted_held_out[i]})
        summary = {which: max(abs(e) for e in self.errors(which)) for which in ("before", "after", "held_out")}
        return {"runs": rows, "efficiency": self.after.to_dict(), "max_abs_error": summary}


def calibrate(run_dirs: list[str | Path], base: Efficiency = Efficiency()) -> CalibrationReport:
    runs = [read_run(d) for d in run_dirs]
    kinds = {run.gpu.name for run in runs}
    if len(kinds) > 1:
        raise CalibrationError(f"runs come from different devices ({', '.join(sorted(kinds))}); calibrate one kind at a time")
    fitted = fit(runs, base)
    held_out = []
    for i, run in enumerate(runs):
        others = runs[:i] + runs[i + 1:]
        held_out.append(predict(run, fit(others, base)) if len(others) >= 2 else float("nan"))
    return CalibrationReport(runs, base, fitted, [predict(r, base) for r in runs], [predict(r, fitted) for r in runs],
                             held_out)


def save_efficiency(efficiency: Efficiency, path: str | Path, device: str, peak_tflops: float) -> None:
    """The fitted factors, the device kind they hold for and the peak they are fractions of."""
    lines = [f"# gigatrain plan --calibrate: efficiency factors fitted on {device} runs",
             f'device = "{device}"', f"peak_tflops = {peak_tflops!r}  # the runs' own measured or catalog peak",
             "[efficiency]"]
    lines += [f"{key} = {value!r}" for key, value in efficiency.to_dict().items()]
    Path(path).write_text("\n".join(lines) + "\n")


def load_efficiency(path: str | Path) -> tuple[Efficiency, dict]:
    """(factors, {"device": ..., "peak_tflops": ...}) from a file save_efficiency wrote, or a
    hand-written one holding just an [efficiency] table."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CalibrationError(f"efficiency file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise CalibrationError(f"efficiency file {str(path)!r} is not valid TOML: {err}") from None
    table = data.get("efficiency", {})
    known = set(Efficiency.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown or not isinstance(table, dict):
        raise CalibrationError(f"efficiency file {path}: unknown factor(s) {', '.join(unknown)} in [efficiency]; "
                               f"known: {', '.join(sorted(known))}")
    meta = {k: data[k] for k in ("device", "peak_tflops") if k in data}
    return Efficiency(**{k: float(v) for k, v in table.items()}), meta

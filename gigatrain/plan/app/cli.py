"""`gigatrain plan`: layout, days, megawatts and cost of training a model on a fleet.

    gigatrain plan --model llama3-405b --tokens 15.6T --gpus 16384 --gpu h100
    gigatrain plan --model llama3-70b --gpus 100k --sweep gpus=8k,16k,32k,100k --plot sweep.png
    gigatrain plan --calibrate runs/a runs/b runs/c runs/d --save-efficiency cpu.toml
    gigatrain plan --published

Bad input ends with one line, `gigatrain: error: ...`, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, fields
from pathlib import Path

from gigatrain.config import ACTIVATION_CHECKPOINTING, PP_SCHEDULES, ConfigError
from gigatrain.fault import EXIT_USAGE
from gigatrain.usage import Parser, UsageError, count, number

# Prices, lifetimes, MTBFs, bandwidths: above zero.
_positive = number("use a positive number", above=True)


def build_parser() -> Parser:
    p = Parser(prog="gigatrain plan", description="Plan a training run: layout, days, MW, cost, reliability.",
               epilog="defaults and their sources: gigatrain plan --sources; method: docs/planner.md")
    what = p.add_argument_group("what to train")
    what.add_argument("--model", help="a preset name (llama3-8b, llama3-70b, llama3-405b, ...) or a TOML config")
    what.add_argument("--tokens", type=count("tokens"), help="token budget, e.g. 15.6T or 300B (default: 20 per parameter)")
    what.add_argument("--seq", type=count("seq", whole=True), help="sequence length (default: the config's or model's)")
    what.add_argument("--batch", type=count("batch"), help="global batch in tokens, e.g. 16M (default: 16Mi, or the config's)")
    what.add_argument("--precision", choices=["bf16", "fp8"], default="bf16", help="which peak the matmuls run at")
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--gpus", type=count("gpus", whole=True), default=8, help="GPUs in the fleet, e.g. 16384 or 100k")
    fleet.add_argument("--gpu", default="h100", help="catalog name: a100, h100, h200, b200, gb200, cpu")
    fleet.add_argument("--catalog", action="append", default=[], metavar="FILE", help="TOML file adding/overriding GPU entries")
    fleet.add_argument("--list-gpus", action="store_true", help="print the hardware catalog and exit")
    search = p.add_argument_group("layout search (fix any choice; the rest is searched)")
    for name in ("tp", "pp", "cp", "dp-shard", "dp-replicate"):
        search.add_argument(f"--{name}", type=count(name, whole=True))
    search.add_argument("--ep", type=count("ep", whole=True),
                        help="expert parallel degree (MoE; carved from dp-shard x cp, divides the experts)")
    search.add_argument("--mbs", type=count("mbs", whole=True), help="micro-batch size (sequences)")
    search.add_argument("--schedule", choices=PP_SCHEDULES, help="pipeline schedule (parallel.pp_schedule)")
    search.add_argument("--virtual-stages", type=count("virtual-stages", whole=True),
                        help="pipeline stages per rank (parallel.pp_stages_per_rank)")
    search.add_argument("--recompute", choices=ACTIVATION_CHECKPOINTING, help="train.activation_checkpointing")
    search.add_argument("--uneven-stages", action="store_true", help="allow pp not dividing the layers (gigatrain needs even)")
    search.add_argument("--exact", action="store_true", help="use exactly --gpus GPUs (default: leave some idle if the batch forces it)")
    search.add_argument("--top", type=count("top", whole=True), default=5, help="layouts to show")
    search.add_argument("--efficiency", metavar="FILE", help="efficiency factors from --calibrate --save-efficiency")
    search.add_argument("--expert-imbalance", type=number("use a number of at least 1", minimum=1.0),
                        help="MoE: slowest EP rank's expert work over the mean (default 1.1, docs/planner.md)")
    cost = p.add_argument_group("power and cost (defaults: --sources)")
    cost.add_argument("--lease-price", type=_positive, help="USD per GPU-hour")
    cost.add_argument("--capex-per-gpu", type=_positive, help="USD per GPU, server share")
    cost.add_argument("--network-capex", type=float, help="fabric capex as a fraction of server capex")
    cost.add_argument("--facility-per-mw", type=_positive, help="USD per MW of IT load")
    cost.add_argument("--server-life", type=_positive, help="years")
    cost.add_argument("--facility-life", type=_positive, help="years")
    cost.add_argument("--electricity", type=_positive, help="USD per MWh")
    cost.add_argument("--pue", type=_positive)
    cost.add_argument("--network-power", type=float, help="network power as a fraction of server power")
    cost.add_argument("--ops", type=float, help="operations per year as a fraction of server capex")
    cost.add_argument("--load-factor", type=_positive, help="average power draw over nameplate")
    rel = p.add_argument_group("reliability (defaults: --sources)")
    rel.add_argument("--gpu-mtbf", type=_positive, help="hours between interruptions caused by one GPU")
    rel.add_argument("--node-mtbf", type=_positive, help="hours between interruptions caused by one server (host)")
    rel.add_argument("--planned-per-day", type=float, help="planned (maintenance) interruptions per day")
    rel.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="reliability_set",
                     help="any reliability input (restart phases, memory and replica costs), e.g. detect_s=30; "
                          "names and sources: --sources")
    rel.add_argument("--storage-bw", type=_positive, help="checkpoint storage bandwidth, GB/s")
    rel.add_argument("--checkpoint-every", type=_positive, help="checkpoint interval in minutes (default: Young/Daly)")
    rel.add_argument("--simulate", type=count("simulate", whole=True), nargs="?", const=2000, default=0,
                     help="Monte Carlo of the run with failures (default 2000 samples)")
    rel.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--sweep", metavar="KEY=V1,V2", help="sweep gpus, gpu, batch, seq or tokens, e.g. gpus=8k,16k,32k")
    out.add_argument("--plot", metavar="PATH", help="sweep PNG (default: plan_sweep.png)")
    out.add_argument("--sources", action="store_true", help="print every default input with its source")
    out.add_argument("--published", action="store_true", help="compare predictions with published large runs")
    out.add_argument("--calibrate", nargs="+", metavar="RUN_DIR", help="fit efficiency factors to measured runs")
    out.add_argument("--save-efficiency", metavar="FILE", help="with --calibrate: write the fitted factors")
    return p


# -- inputs -------------------------------------------------------------------------------
def resolve_model(text: str):
    """(name, ModelArgs, seq_len or None, global batch in sequences or None) from a preset or a TOML config."""
    from gigatrain.models.presets import PRESETS, get_preset

    if text in PRESETS:
        return text, get_preset(text), None, None
    if text.endswith(".toml") or Path(text).is_file():
        from gigatrain.config import global_batch_size, load_config, resolve_model_args

        cfg = load_config(text, [])
        return Path(text).stem, resolve_model_args(cfg), cfg.data.seq_len, global_batch_size(cfg)
    raise UsageError(f"unknown model {text!r}; pass a preset ({', '.join(PRESETS)}) or a TOML config file")


def build_spec(args: argparse.Namespace, catalog: dict):
    from gigatrain.models.flops import param_counts
    from gigatrain.plan.catalog import get_accelerator
    from gigatrain.plan.layout import Constraints
    from gigatrain.plan.costs import Efficiency
    from gigatrain.plan.planner import CHINCHILLA_TOKENS_PER_PARAM, DEFAULT_BATCH_TOKENS, PlanSpec
    from gigatrain.plan.power import CostInputs
    from gigatrain.plan.reliability import ReliabilityInputs

    if not args.model:
        raise UsageError("--model is required; pass a preset such as llama3-8b or a TOML config")
    name, model, config_seq, config_batch = resolve_model(args.model)
    gpu = get_accelerator(args.gpu, catalog)
    if args.precision == "fp8" and gpu.peak_fp8_tflops <= 0:
        raise UsageError(f"{gpu.name} has no FP8 tensor cores; plan it with --precision bf16")
    # A preset's own context is the one it was pretrained at (8192 for Llama 3.1, not the 131,072 its rotary scaling extends it to).
    seq = args.seq or config_seq or model.pretraining_seq_len
    if args.batch:
        batch = max(1, round(args.batch / seq))
    elif config_batch and not args.seq:
        batch = config_batch
    else:
        batch = max(1, round(DEFAULT_BATCH_TOKENS / seq))
    tokens = args.tokens or CHINCHILLA_TOKENS_PER_PARAM * param_counts(model).total
    constraints = Constraints(
        exact_gpus=args.exact, even_stages=not args.uneven_stages, tp=args.tp, pp=args.pp, cp=args.cp,
        dp_shard=args.dp_shard, dp_replicate=args.dp_replicate, micro_batch_size=args.mbs, pp_schedule=args.schedule,
        pp_stages_per_rank=args.virtual_stages, activation_checkpointing=args.recompute, ep=args.ep)
    if args.ep and args.ep > 1 and not model.is_moe:
        raise UsageError(f"--ep {args.ep} needs a mixture-of-experts model; {name} is dense (drop --ep)")
    if args.ep and model.is_moe and model.n_experts % args.ep:
        raise UsageError(f"--ep {args.ep} must divide the {model.n_experts} experts of {name}")
    efficiency = Efficiency()
    if args.efficiency:
        from dataclasses import replace

        from gigatrain.plan.app.calibrate import load_efficiency

        efficiency, meta = load_efficiency(args.efficiency)
        if meta.get("device", gpu.name) != gpu.name:
            raise UsageError(f"{args.efficiency} was fitted on {meta['device']} runs; plan with --gpu {meta['device']} "
                             f"or calibrate on {gpu.name} runs")
        if meta.get("peak_tflops"):  # the factors are fractions of the calibrated machine's own peak
            gpu = replace(gpu, peak_bf16_tflops=float(meta["peak_tflops"]))
    if args.expert_imbalance is not None:
        from dataclasses import replace

        efficiency = replace(efficiency, expert_imbalance=args.expert_imbalance)
    cost = _override(CostInputs(), lease_usd_per_gpu_hour=args.lease_price, capex_usd_per_gpu=args.capex_per_gpu,
                     network_capex_fraction=args.network_capex, facility_usd_per_mw=args.facility_per_mw,
                     server_life_years=args.server_life, facility_life_years=args.facility_life,
                     electricity_usd_per_mwh=args.electricity, pue=args.pue, network_power_fraction=args.network_power,
                     ops_fraction_per_year=args.ops, load_factor=args.load_factor)
    reliability = _override(ReliabilityInputs(), gpu_mtbf_hours=args.gpu_mtbf, node_mtbf_hours=args.node_mtbf,
                            planned_per_day=args.planned_per_day, storage_gbs=args.storage_bw,
                            checkpoint_interval_minutes=args.checkpoint_every, **reliability_settings(args.reliability_set))
    return PlanSpec(model_name=name, model=model, gpu=gpu, gpus=args.gpus, seq_len=seq, global_batch=batch,
                    tokens=tokens, precision=args.precision, constraints=constraints, efficiency=efficiency,
                    cost=cost, reliability=reliability, top=args.top, simulate=args.simulate, seed=args.seed)


def reliability_settings(items: list[str]) -> dict[str, float]:
    """--set KEY=VALUE pairs: numbers for ReliabilityInputs fields."""
    from gigatrain.plan.reliability import ReliabilityInputs

    names = [f.name for f in fields(ReliabilityInputs)]
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise UsageError(f"--set {item!r}: write KEY=VALUE with KEY one of {', '.join(names)}")
        try:
            settings[key] = float(value)
        except ValueError:
            raise UsageError(f"--set {item!r}: {value!r} is not a number; write e.g. {key}=30") from None
    return settings


def _override(inputs, **values):
    from dataclasses import replace

    for name, value in values.items():
        if value is not None and value < 0:
            raise UsageError(f"{name}={value} must not be negative")
    return replace(inputs, **{k: v for k, v in values.items() if v is not None})


# -- commands -----------------------------------------------------------------------------
def _print_json(data) -> None:
    def default(value):
        return None if isinstance(value, float) and not math.isfinite(value) else str(value)

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None  # JSON has no infinity: "never" (e.g. break-even) is null
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    print(json.dumps(clean(data), default=default))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from gigatrain.plan.app.calibrate import calibrate, save_efficiency
    from gigatrain.plan.app.report import print_calibration

    report = calibrate(args.calibrate)
    data = report.to_dict()
    if args.save_efficiency:
        save_efficiency(report.after, args.save_efficiency, report.runs[0].gpu.name, report.runs[0].gpu.peak_bf16_tflops)
        data["saved"] = args.save_efficiency
    _print_json(data) if args.json else print_calibration(data)
    return 0


def cmd_published(args: argparse.Namespace) -> int:
    from gigatrain.plan.app.published import comparison_rows
    from gigatrain.plan.app.report import print_published

    rows = comparison_rows()
    _print_json({"published": rows}) if args.json else print_published(rows)
    return 0


def cmd_sources(args: argparse.Namespace) -> int:
    from gigatrain.plan import power, reliability
    from gigatrain.plan.costs import Efficiency
    from gigatrain.plan.app.report import print_sources

    sections = {
        "power and cost": {f.name: (getattr(power.CostInputs(), f.name), power.SOURCES[f.name])
                           for f in fields(power.CostInputs)},
        "reliability": {f.name: (getattr(reliability.ReliabilityInputs(), f.name), reliability.SOURCES[f.name])
                        for f in fields(reliability.ReliabilityInputs)},
        "efficiency": {name: (value, "docs/planner.md, 'Efficiency factors'") for name, value in asdict(Efficiency()).items()},
    }
    if args.json:
        _print_json({section: {k: {"default": v, "source": s} for k, (v, s) in entries.items()}
                     for section, entries in sections.items()})
    else:
        print_sources(sections)
    return 0


def cmd_list_gpus(args: argparse.Namespace, catalog: dict) -> int:
    if args.json:
        _print_json({name: {k: v for k, v in asdict(entry).items()} for name, entry in catalog.items()})
        return 0
    from rich.table import Table

    from gigatrain.plan.app.report import make_console

    table = Table(title="Hardware catalog (per GPU; sources: gigatrain/plan/hardware.toml)", title_justify="left")
    for column in ("name", "bf16 TF", "fp8 TF", "HBM GB", "HBM GB/s", "NVLink GB/s", "domain", "net GB/s", "TDP W",
                   "$/GPU-h", "description"):
        table.add_column(column, justify="left" if column in ("name", "description") else "right")
    for name, e in catalog.items():
        table.add_row(name, f"{e.peak_bf16_tflops:g}", f"{e.peak_fp8_tflops:g}", f"{e.memory_gb:g}", f"{e.memory_bw_gbs:g}",
                      f"{e.scaleup_bw_gbs:g}", str(e.scaleup_domain), f"{e.scaleout_bw_gbs:g}", f"{e.tdp_w:g}",
                      f"{e.lease_usd_per_gpu_hour:g}", e.description)
    make_console().print(table)
    return 0


def cmd_plan(args: argparse.Namespace, catalog: dict) -> int:
    from gigatrain.plan.planner import make_plan
    from gigatrain.plan.app.report import print_plan, print_sweep
    from gigatrain.plan.app.sweep import parse_sweep, run_sweep

    spec = build_spec(args, catalog)
    if args.sweep:
        key, values = parse_sweep(args.sweep, catalog)
        sweep = run_sweep(spec, key, values, catalog, args.plot or "plan_sweep.png")
        _print_json(sweep) if args.json else print_sweep(sweep)
        return 0
    plan = make_plan(spec)
    _print_json(plan) if args.json else print_plan(plan)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `gigatrain plan ARGS...` (argv excludes the word 'plan'); returns the exit code."""
    from gigatrain.plan.app.calibrate import CalibrationError
    from gigatrain.plan.catalog import CatalogError, load_catalog
    from gigatrain.plan.layout import NoLayoutError
    from gigatrain.plan.app.sweep import SweepError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.calibrate:
            return cmd_calibrate(args)
        if args.published:
            return cmd_published(args)
        if args.sources:
            return cmd_sources(args)
        catalog = load_catalog(args.catalog)
        if args.list_gpus:
            return cmd_list_gpus(args, catalog)
        return cmd_plan(args, catalog)
    except (UsageError, ConfigError, CatalogError, CalibrationError, NoLayoutError, SweepError) as err:
        print(f"gigatrain: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())

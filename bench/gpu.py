"""GPU speed of the trainer: bf16 before/after the chunked loss, float8 (tensorwise, rowwise),
a profile of each, all in one process (one import, one compile cache) and inside a time budget.

Every figure is the trainer's own: each variant is a `gigatrain.train.trainer.Trainer` built
from a config (the model, parallelize, AdamW, the guard, the step records) run on prepared
synthetic data, and tokens/s, MFU and peak memory are read from its metrics.jsonl. Only two
things differ from `gigatrain train`: the final checkpoint and evaluation are left out (a 1B
model's checkpoint takes ~40 s, outside what is measured), and the last steps run under
torch.profiler (excluded from the timing).

    python bench/gpu.py --out DIR                 # on a CUDA GPU: llama3-1b, vocabulary 128,256
    python bench/gpu.py --out DIR --smoke         # every code path on a CPU, tiny sizes, ~1 min

Variants (in this order, the most wanted first; one that would start past --budget-s is
skipped and recorded so):
  before      plain loss (fp32 logits of the whole micro-batch), selective AC
  after       chunked loss, selective AC (also the bf16 reference for float8's losses)
  fp8-tensor  after + train.float8, tensorwise
  after-noac  chunked loss, no activation checkpointing (the memory the chunks free)
  fp8-row     after + train.float8, rowwise
Writes DIR/results.json (every step's record of every variant, profiles, config) and
DIR/summary.md (the table and each profile's top kernels); prints the table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from gigatrain.config import ConfigError
from gigatrain.data.prepare import prepare
from gigatrain.models import loss as loss_module
from gigatrain.rundir import RunDir, resolve_run_config
from gigatrain.train.trainer import Trainer

VARIANTS = {  # name: (chunked loss, activation checkpointing, float8 recipe or None)
    "before": (False, "selective", None),
    "after": (True, "selective", None),
    "fp8-tensor": (True, "selective", "tensorwise"),
    "after-noac": (True, "none", None),
    "fp8-row": (True, "selective", "rowwise"),
}
PROFILED_STEPS = 3  # the last steps of each run, after one profiler warm-up step; not timed
# float8's losses against bf16's over the same steps: stated before the run, judged after.
LOSS_TOLERANCE = {"max_rel_per_step": 0.02, "mean_rel_last_10": 0.01}


def make_data(folder: Path, megabytes: float, seed: int = 0) -> Path:
    """Prepared byte-level data from random words: any text will do for speed, and the model's
    vocabulary (model.vocab_size) is set apart from the tokenizer's."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    for split, size in (("train", megabytes), ("val", max(0.05, megabytes / 20))):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for index in range(4):
            text = " ".join(rng.choice(words) for _ in range(int(size * 1e6 / 4 / 6)))
            (folder / split / f"doc{index}.txt").write_text(text + "\n")
    out = folder / "data"
    prepare([str(folder / "train")], out, val_sources=[str(folder / "val")], tokenizer="byte")
    return out


def overrides_for(args, data: Path, run_dir: Path, variant: str, steps: int, micro_batch: int) -> list[str]:
    _, checkpointing, recipe = VARIANTS[variant]
    common = [f"--data.path={data}", f"--run.dir={run_dir}", f"--train.max_steps={steps}",
              "--train.eval_every=1000000", "--train.checkpoint_every=1000000", "--train.samples=0",
              "--train.eval_batches=1", "--train.progress=off", f"--train.warmup_steps={args.warmup_lr_steps}",
              f"--train.activation_checkpointing={checkpointing}", f"--train.micro_batch_size={micro_batch}",
              f"--train.float8={'true' if recipe else 'false'}", f"--train.float8_recipe={recipe or 'tensorwise'}"]
    if variant == "after" and args.checkpoint_step:
        # The async checkpoint of the whole training state, late enough to leave the timed steps alone.
        common.append(f"--train.checkpoint_every={args.checkpoint_step}")
    if args.smoke:
        return [*common, "--model.preset=tiny", "--model.vocab_size=4096", "--data.seq_len=64",
                f"--train.batch_size={args.batch_size}", f"--train.compile={str(args.compile).lower()}",
                "--train.device=cpu"]
    return [*common, f"--model.preset={args.preset}", f"--model.vocab_size={args.vocab_size}",
            f"--data.seq_len={args.seq_len}", f"--train.batch_size={args.batch_size}", "--train.compile=true",
            "--train.dtype=bfloat16", "--train.device=cuda", "--train.lr=3e-4", *args.override]


def top_kernels(prof, device: torch.device, rows: int = 15) -> str:
    """The profile's top items by self time on the device (CUDA kernels), or on the CPU."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def run_variant(args, data: Path, workdir: Path, variant: str, steps: int, micro_batch: int) -> dict:
    """One trainer run of `steps` steps; its records, timing, memory and profile."""
    chunked = VARIANTS[variant][0]
    # The bench's switch between the two loss paths: all logits through the chunks, or none.
    loss_module.CHUNKED_MIN_LOGITS = 0 if chunked else 1 << 62
    run_dir = workdir / f"run-{variant}-mb{micro_batch}"
    cfg = resolve_run_config(None, overrides_for(args, data, run_dir, variant, steps, micro_batch))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg)
    device = trainer.device
    # The last steps run under the profiler: PROFILED_STEPS recorded after one warm-up step.
    schedule = torch.profiler.schedule(wait=max(0, steps - PROFILED_STEPS - 1), warmup=1, active=PROFILED_STEPS)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = torch.profiler.profile(activities=activities, schedule=schedule)
    train_step = trainer.train_step

    def profiled_step(*a, **k):
        result = train_step(*a, **k)
        prof.step()
        return result

    trainer.train_step = profiled_step
    # Left out of what is measured (see the docstring): the final checkpoint and evaluation.
    trainer.checkpoints.finish = lambda trained: None
    trainer.validator.finish = lambda step, cut, metrics: (None, None)
    try:
        with prof:
            trainer.run()
        trainer.checkpoints.checkpointer.wait()  # the background write of a checkpoint, if one started
    finally:
        trainer.close(clean=False)
    records = [r for r in RunDir(run_dir).metrics_records() if "loss" in r]
    checkpoints = [{k: e.get(k) for k in ("step", "stall_s", "write_s")}
                   for e in RunDir(run_dir).event_records() if e.get("event") == "checkpoint"]
    timed = records[args.warmup_steps : max(args.warmup_steps + 1, len(records) - PROFILED_STEPS - 1)]
    result = {
        "variant": variant, "status": "ok", "micro_batch": micro_batch, "steps": len(records),
        "timed_steps": [timed[0]["step"], timed[-1]["step"]] if timed else None,
        "tokens_per_step": trainer.tokens_per_step,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "first_step_s": records[0]["step_time_s"],  # includes compilation
        "peak_memory_gb": max(r["peak_memory_gb"] for r in records),
        "losses": [r["loss"] for r in records],
        "float8_linears": sum(type(m).__name__ == "Float8Linear" for part in trainer.parallel.parts for m in part.modules()),
        "profile": top_kernels(prof, device),
        "checkpoints": checkpoints,
    }
    return result


def free_memory() -> None:
    """Between variants: no compiled graph or tensor of one run stays for the next."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_losses(reference: list[float], other: list[float]) -> dict:
    n = min(len(reference), len(other))
    rel = [abs(o - r) / abs(r) for r, o in zip(reference[:n], other[:n])]
    last = rel[-10:]
    summary = {"steps": n, "max_rel_per_step": max(rel) if rel else math.nan,
               "mean_rel_last_10": sum(last) / len(last) if last else math.nan}
    summary["within_tolerance"] = all(summary[k] <= v for k, v in LOSS_TOLERANCE.items())
    return summary


def summary_table(results: list[dict], device_name: str) -> str:
    reference = next((r for r in results if r["variant"] == "after" and r["status"] == "ok"), None)
    lines = [f"device: {device_name}; torch {torch.__version__}",
             "| variant | status | micro-batch | timed steps | tokens/s | MFU | step s | peak GB | 1st step s | vs after |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | {r.get('micro_batch', '')} | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / reference['tokens_per_s']:.3f}" if reference else ""
        lines.append(f"| {r['variant']} | ok | {r['micro_batch']} | {r['timed_steps'][0]}-{r['timed_steps'][1]} | "
                     f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['step_time_s']:.3f} | "
                     f"{r['peak_memory_gb']:.1f} | {r['first_step_s']:.1f} | {ratio} |")
    for r in results:
        if "loss_vs_after" in r:
            c = r["loss_vs_after"]
            lines.append(f"{r['variant']} losses vs after over {c['steps']} steps: max rel {c['max_rel_per_step']:.4f}, "
                         f"mean rel last 10 {c['mean_rel_last_10']:.4f} -> within tolerance {LOSS_TOLERANCE}: {c['within_tolerance']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every code path, no figures")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help="with --smoke: compile too (always on a GPU)")
    parser.add_argument("--preset", default="llama3-1b")
    parser.add_argument("--vocab-size", type=int, default=128256, help="the model's vocabulary (llama3's real one)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; smoke 4)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per forward (default 4; smoke 2); "
                        "halved once on out-of-memory")
    parser.add_argument("--steps", type=int, default=25, help="steps of a timing-only run")
    parser.add_argument("--loss-steps", type=int, default=50, help="steps of the runs whose losses are compared "
                        "(after, fp8-*)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--warmup-lr-steps", type=int, default=10, help="train.warmup_steps of every run")
    parser.add_argument("--override", action="append", default=[], help="a --section.key=value for every GPU run "
                        "(repeatable), e.g. --override=--model.n_layers=2")
    parser.add_argument("--checkpoint-step", type=int, default=0, help="the 'after' run saves an async checkpoint "
                        "every this many steps (0: none); its stall and write time go into the results")
    parser.add_argument("--tag", default="", help="names the output files results-TAG.json and summary-TAG.md")
    parser.add_argument("--budget-s", type=float, default=400, help="no variant starts after this many seconds")
    parser.add_argument("--data-mb", type=float, default=None, help="prepared training text (default 4; smoke 0.2)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.loss_steps, args.warmup_steps = min(args.steps, 8), min(args.loss_steps, 8), 2
    args.batch_size = args.batch_size or (4 if args.smoke else 16)
    micro_batch = args.micro_batch or (2 if args.smoke else 4)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; use --smoke to run its code paths on a CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = make_data(workdir, args.data_mb or (0.2 if args.smoke else 4))
        print(f"data prepared in {time.perf_counter() - started:.1f} s", flush=True)
        for variant in variants:
            steps = args.loss_steps if variant in ("after", "fp8-tensor", "fp8-row") else args.steps
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                results.append({"variant": variant, "status": f"skipped: budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"})
                continue
            mb = micro_batch
            while True:
                print(f"[{time.perf_counter() - started:.0f} s] {variant}: {steps} steps, micro-batch {mb}", flush=True)
                out_of_memory = False
                try:
                    result = run_variant(args, data, workdir, variant, steps, mb)
                except torch.OutOfMemoryError:
                    out_of_memory = True  # freed below, once the exception (and the frames it holds) is gone
                    result = {"variant": variant, "status": "out of memory", "micro_batch": mb}
                except ConfigError as err:
                    result = {"variant": variant, "status": f"refused: {err}", "micro_batch": mb}
                except Exception as err:  # one variant's failure must not lose the others' figures
                    traceback.print_exc()
                    result = {"variant": variant, "status": f"failed: {type(err).__name__}: {str(err)[:300]}",
                              "micro_batch": mb}
                if out_of_memory and mb > 1 and mb == micro_batch:
                    free_memory()
                    results.append(result)  # recorded, then once more at half the micro-batch
                    mb //= 2
                    continue
                break
            free_memory()
            results.append(result)
            if result["status"] == "ok":
                print(f"    {result['tokens_per_s']:,.0f} tokens/s, MFU {100 * result['mfu']:.1f}%, "
                      f"peak {result['peak_memory_gb']:.1f} GB, first step {result['first_step_s']:.1f} s; "
                      f"checkpoints {result['checkpoints']}", flush=True)
            else:
                print(f"    {result['status']}", flush=True)
    reference = next((r for r in results if r["variant"] == "after" and r["status"] == "ok"), None)
    for r in results:
        if reference and r["status"] == "ok" and r["variant"].startswith("fp8"):
            r["loss_vs_after"] = compare_losses(reference["losses"], r["losses"])
    table = summary_table(results, device_name)
    report = {"device": device_name, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "loss_tolerance": LOSS_TOLERANCE, "seconds": time.perf_counter() - started, "results": results}
    suffix = f"-{args.tag}" if args.tag else ""
    (args.out / f"results{suffix}.json").write_text(json.dumps(report, indent=1))
    profiles = "\n\n".join(f"### {r['variant']} (top 15 by device self time, {PROFILED_STEPS} steps)\n\n```\n{r['profile']}\n```"
                           for r in results if r["status"] == "ok")
    (args.out / f"summary{suffix}.md").write_text(f"# bench/gpu.py\n\n{table}\n\n{profiles}\n")
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0 if any(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

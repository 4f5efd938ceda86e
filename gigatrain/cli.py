"""`gigatrain prepare|train|eval|generate|report|plan|launch`.

User mistakes (a bad config key, a missing file, a corrupted shard) end with one
line on stderr, `gigatrain: error: ...`, and exit code 2, never a traceback. Under
torchrun that line comes once, from rank 0 (docs/launch.md, "When a run fails").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
# How long a torchrun worker other than rank 0 waits, after an error, for torchrun to stop it
# (rank 0, meeting the same error, reports it and exits) before it reports the error itself.
DEFER_TO_RANK0_S = 10.0


class UsageError(Exception):
    """Raised instead of argparse's exit, so every bad input ends the same way."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    _report(f"gigatrain: error: {message}")
    return code


def _report(line: str) -> None:
    """Print an error line, and hand it to torchrun, which shows it in its failure summary.

    Every torchrun worker meets the same config, usage or data error: rank 0 reports it, and
    torchrun then stops the others, which wait for that and so stay silent. A worker still
    running after DEFER_TO_RANK0_S reports its own error: it may be one that rank 0 did not meet."""
    if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("RANK", "0") != "0":
        time.sleep(DEFER_TO_RANK0_S)
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # The layout of torch.distributed.elastic's ErrorHandler.record_exception, with the
        # line in place of a Python traceback: torchrun's summary prints it as the traceback.
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        try:
            Path(error_file).write_text(json.dumps(record))
        except OSError:
            pass  # the line is on stderr; torchrun's summary then says less


# -- prepare --------------------------------------------------------------------------------
def _exit_on_sigterm(signum, frame) -> None:
    # SystemExit unwinds the stack, so `prepare` removes its temporary folder on the way out.
    sys.exit(128 + signum)


def cmd_prepare(args: argparse.Namespace) -> int:
    import signal

    from gigatrain.data.prepare import prepare

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    manifest = prepare(args.sources, Path(args.out), val_sources=args.val, tokenizer=args.tokenizer,
                       vocab_size=args.vocab_size, val_fraction=args.val_fraction, text_field=args.text_field,
                       seed=args.seed, overwrite=args.overwrite)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, {split['bytes']:,} bytes, "
              f"{len(split['shards'])} shard(s)")
    print(f"wrote {args.out}/manifest.json (tokenizer {manifest['tokenizer']['kind']}, "
          f"vocabulary {manifest['tokenizer']['vocab_size']:,}, {manifest['dtype']})")
    return 0


# -- train ----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from gigatrain.checkpoint.dcp import CheckpointWriteError
    from gigatrain.fault import EXIT_CHECKPOINT_WRITE, EXIT_DIVERGED, EXIT_REQUEUE, EXIT_SIGINT
    from gigatrain.fault.guard import TrainingDiverged
    from gigatrain.train.trainer import PREEMPTION_SIGNALS, process_start_time, resolve_run_config, train

    cfg = resolve_run_config(args.config, overrides)
    try:
        result = train(cfg, started_at=process_start_time())  # train.time_limit_s covers the whole command
    except TrainingDiverged as err:
        return _fail(str(err), EXIT_DIVERGED)
    except CheckpointWriteError as err:
        return _fail(str(err), EXIT_CHECKPOINT_WRITE)
    if result.stopped_by in PREEMPTION_SIGNALS:
        return EXIT_REQUEUE  # a checkpoint was saved: the launcher requeues the job to resume
    if result.stopped_by == "SIGINT":
        return EXIT_SIGINT
    return 0


# -- eval -----------------------------------------------------------------------------------
def _device(name: str):
    from gigatrain.train.trainer import pick_device, pick_dtype

    device = pick_device(name)
    return device, pick_dtype("auto", device)


def cmd_eval(args: argparse.Namespace) -> int:
    from gigatrain.data.prepare import expand_sources, iter_documents
    from gigatrain.train.evaluate import evaluate_text
    from gigatrain.train.rundir import load_run

    device, dtype = _device(args.device)
    run = load_run(Path(args.run_dir), device)
    documents = [doc.text for file in expand_sources(args.text) for doc in iter_documents(file, args.text_field)]
    result = evaluate_text(run.model, documents, run.tokenizer, run.cfg.data.seq_len, args.batch_size, device, dtype)
    result.update({"step": run.step, "run_dir": args.run_dir, "tokenizer": run.tokenizer.kind})
    print(json.dumps(result))
    return 0


# -- generate -------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from gigatrain.train.evaluate import sample_text
    from gigatrain.train.rundir import load_run

    device, dtype = _device(args.device)
    run = load_run(Path(args.run_dir), device)
    generator = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        text = sample_text(run.model, run.tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, context_len=run.cfg.data.seq_len, device=device, dtype=dtype,
                           generator=generator)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


# -- report ---------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from gigatrain.metrics.report import report

    report(Path(args.run_dir))
    return 0


# -- launch ---------------------------------------------------------------------------------
def cmd_launch(args: argparse.Namespace, overrides: list[str], argv: list[str]) -> int:
    """Render a Slurm script or a Kubernetes manifest that runs `gigatrain train` on many nodes."""
    from gigatrain.launch import LaunchError, prepare_job

    try:
        job = prepare_job(args.config, overrides, nodes=args.nodes, procs_per_node=args.gpus_per_node, cpu=args.cpu,
                          max_restarts=args.max_restarts, port=args.port, name=args.job_name)
        render = _render_slurm if args.target == "slurm" else _render_k8s
        text, out = render(job, args, argv)
    except LaunchError as err:
        return _fail(str(err))
    if out == "-":
        sys.stdout.write(text)
        return 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(f"wrote {out}; start it with: " + ("sbatch " if args.target == "slurm" else "kubectl apply -f ") + out)
    return 0


def _render_slurm(job, args: argparse.Namespace, argv: list[str]) -> tuple[str, str]:
    import dataclasses
    import shlex

    from gigatrain.launch import slurm

    if not args.job_name:
        job = dataclasses.replace(job, name=slurm.default_name(job.cfg.run.name))
    run_dir = job.cfg.run_dir.absolute()
    text = slurm.render(job, run_dir=run_dir, workdir=Path.cwd(), partition=args.partition, time=args.time,
                        cpus_per_task=args.cpus_per_task, command_line=shlex.join(["gigatrain", *argv]))
    # Slurm opens the job's log files there before the script runs: the folder must exist.
    (run_dir / "launch").mkdir(parents=True, exist_ok=True)
    return text, args.out or str(run_dir / "launch" / "slurm.sbatch")


def _render_k8s(job, args: argparse.Namespace, argv: list[str]) -> tuple[str, str]:
    import dataclasses

    from gigatrain.launch import k8s

    if not args.job_name:
        job = dataclasses.replace(job, name=k8s.default_name(job.cfg.run.name, args.kind, job.nodes))
    volumes = [k8s.parse_volume(v) for v in args.volume]
    text = k8s.render(job, kind=args.kind, image=args.image, namespace=args.namespace, volumes=volumes)
    run_dir = job.cfg.run_dir
    if not any(run_dir.is_absolute() and run_dir.is_relative_to(path) for _, path in volumes):
        print(f"gigatrain: warning: run.dir {str(run_dir)!r} is not on a --volume; the pods' checkpoints are lost "
              f"when they end", file=sys.stderr)
    return text, args.out or "-"


def _launch_parsers(sub) -> None:
    p = sub.add_parser("launch", help="write a Slurm script or Kubernetes manifest for a multi-node run",
                       epilog="examples: gigatrain launch slurm --nodes 4 --gpus-per-node 8 configs/llama3-1b-gpu.toml; "
                              "gigatrain launch k8s --nodes 2 --gpus-per-node 8 --image REGISTRY/gigatrain:TAG "
                              "configs/llama3-1b-gpu.toml | kubectl apply -f -")
    targets = p.add_subparsers(dest="target", metavar="TARGET", parser_class=Parser, required=True)

    def common(target: Parser) -> None:
        target.add_argument("config", help="a TOML config; any key can be overridden as --section.key=value")
        target.add_argument("--nodes", type=int, required=True, help="number of nodes (one torchrun each)")
        target.add_argument("--gpus-per-node", type=int, required=True, help="processes per node: one per GPU")
        target.add_argument("--cpu", action="store_true", help="CPU processes instead of GPUs (gloo backend)")
        target.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts of the workers after a failure")
        target.add_argument("--port", type=int, default=29500, help="TCP port of the c10d rendezvous on the first node")
        target.add_argument("--job-name", default=None, help="default: gigatrain-<run.name>")

    t = targets.add_parser("slurm", help="an sbatch script (default: <run_dir>/launch/slurm.sbatch)")
    common(t)
    t.add_argument("--partition", default=None)
    t.add_argument("--time", default=None, help="time limit, HH:MM:SS or D-HH:MM:SS; the job is requeued at its end")
    t.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node (default: 8 per GPU, 1 per CPU process)")
    t.add_argument("--out", default=None, help="output file, - for stdout")

    t = targets.add_parser("k8s", help="a Kubernetes manifest: PyTorchJob or JobSet, plus a ConfigMap (JSON, to stdout)")
    common(t)
    t.add_argument("--kind", default="pytorchjob", choices=["pytorchjob", "jobset"])
    t.add_argument("--image", default="gigatrain:latest", help="container image with gigatrain installed")
    t.add_argument("--namespace", default="default")
    t.add_argument("--volume", action="append", default=[], metavar="CLAIM:PATH",
                   help="mount a PersistentVolumeClaim in every pod (for data.path and run.dir); repeatable")
    t.add_argument("--out", default=None, help="output file (default: stdout)")


def build_parser() -> Parser:
    parser = Parser(prog="gigatrain", description="Train GPT-style language models, from one CPU to thousands of GPUs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("prepare", help="tokenize text into token shards plus a manifest")
    p.add_argument("sources", nargs="+", help="text files, folders, globs, .jsonl or .parquet files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val", nargs="+", default=None, help="explicit validation sources (default: split by document)")
    p.add_argument("--tokenizer", default="bpe", help="byte, bpe (trained on the data) or a path to a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 4096; --tokenizer bpe only)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl / column of .parquet")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")

    p = sub.add_parser("train", help="train (or resume) a model; any config key as --section.key=value",
                       epilog="examples: gigatrain train --model.preset=tiny --train.max_steps=200; "
                              "gigatrain train configs/cpu.toml --run.dir=runs/a")
    p.add_argument("config", nargs="?", default=None, help="a TOML config (see configs/)")

    p = sub.add_parser("eval", help="loss and bits per byte of a run's latest checkpoint on a text")
    p.add_argument("run_dir")
    p.add_argument("--text", nargs="+", required=True, help="text file(s), folder(s) or glob(s)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl / column of .parquet")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("report", help="summarise a run and redraw its plots")
    p.add_argument("run_dir")

    sub.add_parser("plan", help="plan a cluster: layout, days, MW, cost (gigatrain plan --help)", add_help=False)
    _launch_parsers(sub)
    return parser


def run(argv: list[str]) -> int:
    from gigatrain.checkpoint.dcp import CheckpointError
    from gigatrain.config import ConfigError
    from gigatrain.data import DataError

    if argv and argv[0] == "plan":
        from gigatrain.plan.cli import main as plan_main

        return plan_main(argv[1:])
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        overrides = [a for a in extra if a.startswith("--") and "." in a.split("=")[0]]
        unknown = [a for a in extra if a not in overrides]
        if unknown:
            raise UsageError(f"gigatrain {args.command}: unrecognized arguments: {' '.join(unknown)}"
                             + ("; config overrides are written --section.key=value" if args.command in ("train", "launch") else ""))
        if overrides and args.command not in ("train", "launch"):
            raise UsageError(f"gigatrain {args.command}: config overrides such as {overrides[0]} apply to `gigatrain train` "
                             f"and `gigatrain launch` only")
        if args.command == "train":
            return cmd_train(args, overrides)
        if args.command == "launch":
            return cmd_launch(args, overrides, argv)
        return {"prepare": cmd_prepare, "eval": cmd_eval, "generate": cmd_generate, "report": cmd_report}[args.command](args)
    except UsageError as err:
        _report(str(err))
        return EXIT_USAGE
    except (ConfigError, DataError, CheckpointError) as err:
        return _fail(str(err))
    except FileNotFoundError as err:
        return _fail(f"{err.filename}: no such file or directory")


def main() -> None:
    sys.exit(run(sys.argv[1:]))

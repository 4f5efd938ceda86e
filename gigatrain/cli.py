"""`gigatrain prepare|train|eval|generate|export|import|report|plan|launch|lighthouse`.

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
from typing import TYPE_CHECKING

from gigatrain.fault import EXIT_USAGE
from gigatrain.ranks import is_main_process, world_size
from gigatrain.usage import Parser, UsageError, number

if TYPE_CHECKING:
    from gigatrain.config import Config

# How long a torchrun worker other than rank 0 waits, after an error, for torchrun to stop it
# (rank 0, meeting the same error, reports it and exits) before it reports the error itself.
DEFER_TO_RANK0_S = 10.0


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    _report(f"gigatrain: error: {message}")
    return code


def _report(line: str) -> None:
    """Print an error line, and hand it to torchrun, which shows it in its failure summary.

    Every torchrun worker meets the same config, usage or data error: rank 0 reports it, and
    torchrun then stops the others, which wait for that and so stay silent. A worker still
    running after DEFER_TO_RANK0_S reports its own error: it may be one that rank 0 did not meet."""
    if "TORCHELASTIC_RUN_ID" in os.environ and not is_main_process():
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


# -- lighthouse -----------------------------------------------------------------------------
def cmd_lighthouse(args: argparse.Namespace) -> int:
    from gigatrain.train.replica import serve_lighthouse

    for name in ("min_replicas", "join_timeout_ms", "quorum_tick_ms", "heartbeat_timeout_ms"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is not valid; it must be at least 1")
    return serve_lighthouse(args.bind, args.min_replicas, args.join_timeout_ms, args.quorum_tick_ms,
                            args.heartbeat_timeout_ms)


# -- train ----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from gigatrain.checkpoint.dcp import CheckpointWriteError
    from gigatrain.fault import EXIT_CHECKPOINT_WRITE, EXIT_DIVERGED, EXIT_REQUEUE, EXIT_SIGINT
    from gigatrain.fault.guard import TrainingDiverged
    from gigatrain.rundir import resolve_run_config
    from gigatrain.train.stopping import PREEMPTION_SIGNALS, process_start_time
    from gigatrain.train.trainer import train

    if args.world_size is not None and not args.dry_run:
        raise UsageError(f"--world-size {args.world_size} applies to --dry-run only; a real run's world size is "
                         f"torchrun's --nnodes x --nproc-per-node")
    cfg = resolve_run_config(args.config, overrides)
    if args.dry_run:
        return dry_run(cfg, args.world_size or world_size())
    if cfg.fault.warm_spare:
        from gigatrain.fault.spare import start_spare

        start_spare(run)  # torchrun's restarts of this worker start from it (a no-op without them)
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


def dry_run(cfg: Config, n_processes: int) -> int:
    """`train --dry-run`: the checks the trainer makes before it starts (the config, the layout
    for `n_processes`, the prepared data folder, GIGATRAIN_FAULT), and what it would run;
    no process group, data preparation, model or run directory is made."""
    from gigatrain.config import resolve_model_args
    from gigatrain.data.loader import TokenData
    from gigatrain.fault.inject import ENV, FaultPlan
    from gigatrain.models.flops import param_counts
    from gigatrain.parallel.mesh import parallel_dims
    from gigatrain.rundir import RunDir

    dims = parallel_dims(cfg, resolve_model_args(cfg), n_processes)
    data = TokenData(Path(cfg.data.path), verify=False) if cfg.data.path else None
    FaultPlan.from_env(cfg.run_dir, 0, n_processes)  # the faults to rehearse, checked against the world size
    if not is_main_process():
        return 0  # under torchrun, one report
    model = resolve_model_args(cfg, vocab_size=data.vocab_size if data else None)
    counts = param_counts(model)
    resumed = "continues the run there" if RunDir(cfg.run_dir).read_config() is not None else "a new run"
    lines = [
        f"run        {cfg.run_dir} ({resumed})",
        f"model      {cfg.model.preset}: {model.n_layers} layers, d_model {model.d_model}, {model.n_heads} heads "
        f"({model.n_kv_heads} kv), {(counts.total - counts.embedding - counts.output) / 1e6:,.1f}M parameters "
        f"besides the embeddings"
        # A mixture of experts: what one token goes through too (the router, its top_k experts).
        + (f"; {model.n_experts} experts, {model.top_k} per token: {counts.total / 1e6:,.1f}M in all, "
           f"{counts.active / 1e6:,.1f}M active" if model.is_moe else ""),
        f"layout     {n_processes} process(es): " + " ".join(f"{axis}={value}" for axis, value in dims.degrees().items())
        + (f" {dims.pp_schedule}" if dims.pp > 1 else "")
        + (f", experts over ep={dims.ep} of the dp_shard*cp ranks" if dims.ep > 1 else "")
        + (f", activation checkpointing {dims.activation_checkpointing}" if dims.activation_checkpointing != "none" else "")
        + (" (parallel.auto)" if cfg.parallel.auto else ""),
        f"batch      {dims.global_batch} x {cfg.data.seq_len} = {dims.global_batch * cfg.data.seq_len:,} tokens per step; "
        f"{dims.local_batch} sequences per data-parallel rank in {dims.microbatches} micro-batch(es) of {dims.micro_batch_size}",
        "data       " + (f"{data.path} (vocabulary {data.vocab_size:,})" if data else
                          f"the default corpus ({cfg.data.tokenizer} tokenizer; prepared on first use)"),
    ]
    if os.environ.get(ENV):
        lines.append(f"faults     {ENV}={os.environ[ENV]}")
    print("\n".join(lines))
    print(f"dry run: the config and layout are valid for {n_processes} process(es); nothing was trained")
    return 0


# -- eval -----------------------------------------------------------------------------------
def _device(name: str):
    from gigatrain.parallel.device import pick_device, pick_dtype

    device = pick_device(name)
    return device, pick_dtype("auto", device)


def cmd_eval(args: argparse.Namespace) -> int:
    from gigatrain.data.prepare import expand_sources, iter_documents
    from gigatrain.train.evaluate import evaluate_text
    from gigatrain.train.checkpointing import load_run

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
    from gigatrain.train.checkpointing import load_run

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


# -- export ---------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from gigatrain.interop.export import DEFAULT_MAX_SHARD_SIZE, DTYPES, export, parse_size

    try:
        max_shard_bytes = parse_size(args.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    except ValueError as err:
        raise UsageError(f"--max-shard-size: {err}") from None
    result = export(Path(args.run_dir), Path(args.out), step=args.step, dtype=DTYPES.get(args.dtype),
                    max_shard_bytes=max_shard_bytes,
                    report=lambda line: print(f"gigatrain: warning: {line}", file=sys.stderr))
    print(f"exported step {result.step} of {args.run_dir} to {result.out} ({str(result.dtype).removeprefix('torch.')}, "
          f"{result.total_bytes / 1e6:.1f} MB in {len(result.files)} file(s))")
    return 0


# -- import ---------------------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    from gigatrain.interop.importer import import_hf

    imported = import_hf(Path(args.hf_dir), Path(args.out))
    a = imported.args
    print(f"imported {imported.tensors} tensors of {args.hf_dir} ({a.n_layers} layers, d_model {a.d_model}, "
          f"{a.n_heads} heads ({a.n_kv_heads} kv), vocabulary {a.vocab_size:,}; preset {imported.preset} plus "
          f"overrides) into {args.out} at step 0")
    print(f"continue training it: gigatrain prepare TEXT --tokenizer {args.out}/tokenizer.json --out DATA; "
          f"gigatrain train --run.dir={args.out} --data.path=DATA")
    return 0


# -- report ---------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from gigatrain.metrics.report import report
    from gigatrain.rundir import RunDir

    report(RunDir(args.run_dir))
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
    from gigatrain.rundir import RunDir

    if not args.job_name:
        job = dataclasses.replace(job, name=slurm.default_name(job.cfg.run.name))
    run_dir = job.cfg.run_dir.absolute()
    text = slurm.render(job, run_dir=run_dir, workdir=Path.cwd(), partition=args.partition, time=args.time,
                        cpus_per_task=args.cpus_per_task, command_line=shlex.join(["gigatrain", *argv]))
    # Slurm opens the job's log files there before the script runs: the folder must exist.
    launch_dir = RunDir(run_dir).launch
    launch_dir.mkdir(parents=True, exist_ok=True)
    return text, args.out or str(launch_dir / "slurm.sbatch")


def _render_k8s(job, args: argparse.Namespace, argv: list[str]) -> tuple[str, str]:
    import dataclasses

    from gigatrain.launch import k8s

    if not args.job_name:
        from gigatrain.launch import replica_groups

        job = dataclasses.replace(job, name=k8s.default_name(job.cfg.run.name, args.kind, job.nodes,
                                                             replica_groups(job.cfg)))
    volumes = [k8s.parse_volume(v) for v in args.volume]
    text = k8s.render(job, kind=args.kind, image=args.image, namespace=args.namespace, volumes=volumes)
    run_dir = job.cfg.run_dir
    if not any(run_dir.is_absolute() and run_dir.is_relative_to(path) for _, path in volumes):
        print(f"gigatrain: warning: run.dir {str(run_dir)!r} is not on a --volume; the pods' checkpoints are lost "
              f"when they end", file=sys.stderr)
    return text, args.out or "-"


def _launch_parsers(sub) -> None:
    # The config is for one GPU: on N x G GPUs the examples pass a global batch that splits into
    # its micro-batches of 4 (tests/test_docs_commands.py runs them).
    p = sub.add_parser("launch", help="write a Slurm script or Kubernetes manifest for a multi-node run",
                       epilog="examples:\n"
                              "  gigatrain launch slurm --nodes 4 --gpus-per-node 8 configs/llama3-1b-gpu.toml "
                              "--train.batch_size=128\n"
                              "  gigatrain launch k8s --nodes 2 --gpus-per-node 8 --image registry.example/gigatrain:1.0 "
                              "--volume training-pvc:/mnt/train configs/llama3-1b-gpu.toml --train.batch_size=64 "
                              "--run.dir=/mnt/train/runs/1b | kubectl apply -f -")
    targets = p.add_subparsers(dest="target", metavar="TARGET", parser_class=Parser, required=True)

    def common(target: Parser) -> None:
        target.add_argument("config", help="a TOML config; any key can be overridden as --section.key=value")
        target.add_argument("--nodes", type=int, required=True, help="number of nodes (one torchrun each)")
        target.add_argument("--gpus-per-node", type=int, required=True, help="processes per node: one per GPU")
        target.add_argument("--cpu", action="store_true", help="CPU processes instead of GPUs (gloo backend)")
        target.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts of the workers after a failure")
        target.add_argument("--port", type=int, default=29500, help="TCP port of the c10d rendezvous on the first node")
        target.add_argument("--job-name", default=None, help="the job's name (default: gigatrain-<run.name>)")

    t = targets.add_parser("slurm", help="an sbatch script (default: <run_dir>/launch/slurm.sbatch)")
    common(t)
    t.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    t.add_argument("--time", default=None, help="time limit, HH:MM:SS or D-HH:MM:SS; the job checkpoints and is "
                                                 "requeued at its end (default: the partition's)")
    t.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node (default: 8 per GPU, 1 per CPU process)")
    t.add_argument("--out", default=None, help="output file, - for stdout (default: <run.dir>/launch/slurm.sbatch)")

    t = targets.add_parser("k8s", help="a Kubernetes manifest: PyTorchJob or JobSet, plus a ConfigMap (JSON, to stdout)")
    common(t)
    t.add_argument("--kind", default="pytorchjob", choices=["pytorchjob", "jobset"])
    t.add_argument("--image", default="gigatrain:latest", help="container image with gigatrain installed")
    t.add_argument("--namespace", default="default")
    t.add_argument("--volume", action="append", default=[], metavar="CLAIM:PATH",
                   help="mount a PersistentVolumeClaim in every pod (for data.path and run.dir); repeatable")
    t.add_argument("--out", default=None, help="output file (default: stdout)")


def _config_keys_help() -> str:
    """The config keys of gigatrain/config.py, one per line: key, default, what it takes."""
    from gigatrain.config import PRESET_RECIPES, describe_keys
    from gigatrain.models.presets import PRESETS

    def shown(default: object) -> str:
        if default is None:
            return "(unset)"
        if isinstance(default, bool):
            return "true" if default else "false"
        return json.dumps(default) if isinstance(default, str) else str(default)

    rows = [(f"{section}.{key}", shown(default), kind)
            for section, keys in describe_keys().items() for key, kind, default in keys]
    key_width, default_width = (max(len(row[i]) for row in rows) for i in (0, 1))
    return "\n".join(["config keys (key, default, what it takes):",
                      *(f"  {key:<{key_width}}  {default:<{default_width}}  {kind}" for key, default, kind in rows),
                      f"model presets: {', '.join(PRESETS)}; (unset) model shapes are the preset's",
                      *(f"preset {preset} brings its recipe, {_settings(recipe)}; the other presets train with "
                        f"{_settings({key: _dataclass_default(key) for key in recipe})}"
                        for preset, recipe in PRESET_RECIPES.items())])


def _settings(values: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in values.items())


def _dataclass_default(dotted: str) -> object:
    from gigatrain.config import Config

    section, _, key = dotted.partition(".")
    return getattr(getattr(Config(), section), key)


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
                       description="Train a model, or continue the run in run.dir. Every config key below can be "
                                   "set in a TOML file\n(`key = value` under `[section]`) or on the command line "
                                   "as --section.key=value (with '=').",
                       epilog=_config_keys_help() + "\n\nexamples:\n"
                              "  gigatrain train --model.preset=tiny --train.max_steps=200\n"
                              "  gigatrain train configs/cpu.toml --run.dir=runs/a\n"
                              "  gigatrain train configs/llama3-1b-gpu.toml --train.batch_size=128 --dry-run --world-size 32")
    p.add_argument("config", nargs="?", default=None, help="a TOML config (see configs/); default: the built-in defaults")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the parallel layout, the data folder and GIGATRAIN_FAULT, print what would "
                        "run, and exit without training")
    p.add_argument("--world-size", type=number("pass the number of processes, e.g. --world-size 32", minimum=1, integer=True),
                   default=None, metavar="N",
                   help="with --dry-run: the number of processes to check the layout for, as torchrun's --nnodes x "
                        "--nproc-per-node would start (default: $WORLD_SIZE under torchrun, else 1)")

    devices = ["auto", "cpu", "cuda"]
    run_dir_help = "a training run's directory (its run.dir, e.g. runs/<name>)"
    p = sub.add_parser("eval", help="loss and bits per byte of a run's latest checkpoint on a text",
                       description="Evaluate the latest checkpoint of a run on any text: prints one JSON line with "
                                   "loss (nats/token) and bits_per_byte.")
    p.add_argument("run_dir", help=run_dir_help)
    p.add_argument("--text", nargs="+", required=True, help="text file(s), folder(s) or glob(s)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl / column of .parquet")
    p.add_argument("--batch-size", type=number("use 1 or more sequences per forward pass", minimum=1, integer=True),
                   default=8, metavar="N",
                   help="sequences of data.seq_len tokens per forward pass")
    p.add_argument("--device", default="auto", choices=devices, help="auto: cuda where available, else cpu")

    p = sub.add_parser("generate", help="sample text from a run's latest checkpoint",
                       description="Sample text from the latest checkpoint of a run; prints the prompt and its "
                                   "continuation.")
    p.add_argument("run_dir", help=run_dir_help)
    p.add_argument("--prompt", default="", help="the text to continue; empty: a new document")
    p.add_argument("--max-new-tokens", type=number("use 1 or more tokens", minimum=1, integer=True), default=200,
                   metavar="N",
                   help="tokens to sample at most (fewer if the model ends the document)")
    p.add_argument("--temperature", type=number("use 0 (greedy: always the likeliest token) or a positive temperature such as 0.8"),
                   default=0.8, metavar="T",
                   help="sampling temperature; 0: greedy, always the likeliest token")
    p.add_argument("--top-k", type=number("use 0 (no top-k filtering) or a positive number of tokens", integer=True),
                   default=50, metavar="K",
                   help="sample among the k likeliest tokens only; 0: among all")
    p.add_argument("--num-samples", type=number("use 1 or more samples", minimum=1, integer=True), default=1,
                   metavar="N",
                   help="samples to print")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto", choices=devices, help="auto: cuda where available, else cpu")

    p = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face folder (Llama, Qwen3, Mixtral, Qwen3-MoE)",
                       description="Write a run's checkpoint as a folder that transformers loads with "
                                   "AutoModelForCausalLM.from_pretrained(DIR): config.json, generation_config.json, "
                                   "safetensors weights and the tokenizer. Checkpoints of any layout (FSDP, TP, PP) "
                                   "are read one tensor at a time, so the model need not fit in memory.")
    p.add_argument("run_dir", help=run_dir_help)
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to create (new, or empty)")
    p.add_argument("--step", type=number("use the step of one of the run's checkpoints", minimum=0, integer=True),
                   default=None, metavar="N", help="export checkpoints/step_N (default: the newest that verifies)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the weights' dtype (default: bfloat16 if the run trained in bf16, else float32)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="the largest safetensors file, e.g. 5GB, 500MB (default: 5GB); a larger model is split "
                        "into model-0000i-of-0000N.safetensors plus model.safetensors.index.json")

    p = sub.add_parser("import", help="a local Hugging Face folder (Llama, Qwen3, Mixtral, Qwen3-MoE) as a run directory at step 0",
                       description="Turn a local Hugging Face Llama, Qwen3, Mixtral or Qwen3-MoE folder (config.json, model.safetensors or its "
                                   "sharded index, tokenizer.json) into a gigatrain run directory at step 0, which "
                                   "`gigatrain train --run.dir=RUN_DIR --data.path=DATA` continues. Nothing is "
                                   "downloaded, and nothing in the folder is executed: safetensors only.")
    p.add_argument("hf_dir", help="the Hugging Face model folder")
    p.add_argument("--out", required=True, help="the new run directory (must not exist, or be empty)")

    p = sub.add_parser("report", help="summarise a run and redraw its plots",
                       description="Print a run's summary (steps, losses, tokens/s, MFU, goodput, restarts) and "
                                   "redraw loss.png and throughput.png in its directory.")
    p.add_argument("run_dir", help=run_dir_help)

    sub.add_parser("plan", help="plan a cluster: layout, days, MW, cost (gigatrain plan --help)", add_help=False)

    p = sub.add_parser("lighthouse", help="serve torchft's Lighthouse for fault.recovery=replica (until Ctrl-C)",
                       description="The quorum server the replica groups of fault.recovery=replica join "
                                   "(docs/fault-tolerance.md, \"Replica groups\"); it prints its address.")
    p.add_argument("--bind", default="[::]:29510", help="address and port to serve on (default: [::]:29510)")
    p.add_argument("--min-replicas", type=int, default=1, help="replica groups a quorum needs (default: 1)")
    p.add_argument("--join-timeout-ms", type=int, default=10000,
                   help="how long a quorum waits for a live group that has not asked to join yet (default: 10000)")
    p.add_argument("--quorum-tick-ms", type=int, default=100, help="how often a waiting quorum is checked (default: 100)")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=5000,
                   help="silence after which a group is taken for dead (default: 5000)")
    _launch_parsers(sub)
    return parser


def _check_override_form(argv: list[str]) -> None:
    """`--train.max_steps 10` would make 10 the config file: an override followed by a word
    that is neither an option nor a config file is taken to be missing its '='."""
    for word, following in zip(argv, argv[1:]):
        if (word.startswith("--") and "." in word and "=" not in word and not following.startswith("--")
                and not following.endswith(".toml")):
            raise UsageError(f"{word} {following}: a config override takes its value after '=': write {word}={following}")


def run(argv: list[str]) -> int:
    from gigatrain.checkpoint.dcp import CheckpointError
    from gigatrain.config import ConfigError
    from gigatrain.data import DataError

    if argv and argv[0] == "plan":
        from gigatrain.plan.app.cli import main as plan_main

        return plan_main(argv[1:])
    parser = build_parser()
    try:
        if argv and argv[0] in ("train", "launch"):
            _check_override_form(argv)
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        overrides = [a for a in extra if a.startswith("--") and "." in a.split("=")[0]]
        unknown = [a for a in extra if a not in overrides]
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}"
                             + ("; config overrides are written --section.key=value" if args.command in ("train", "launch") else "")
                             + f" (see `gigatrain {args.command} --help`)")
        if overrides and args.command not in ("train", "launch"):
            raise UsageError(f"config overrides such as {overrides[0]} apply to `gigatrain train` and `gigatrain launch`, "
                             f"not `gigatrain {args.command}`")
        if args.command == "train":
            return cmd_train(args, overrides)
        if args.command == "launch":
            return cmd_launch(args, overrides, argv)
        if args.command == "lighthouse":
            return cmd_lighthouse(args)
        return {"prepare": cmd_prepare, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export,
                "import": cmd_import,
                "report": cmd_report}[args.command](args)
    except UsageError as err:
        return _fail(str(err))
    except (ConfigError, DataError, CheckpointError) as err:
        return _fail(str(err))
    except FileNotFoundError as err:
        return _fail(f"{err.filename}: no such file or directory")


def main() -> None:
    from gigatrain.fault.spare import hand_over

    # A restarted torchrun worker hands its command to the job's warm spare, when there is one,
    # before it imports torch (gigatrain.fault.spare).
    code = hand_over(sys.argv[1:])
    sys.exit(run(sys.argv[1:]) if code is None else code)

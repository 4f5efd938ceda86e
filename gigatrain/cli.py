"""`gigatrain prepare|train|eval|generate|report|plan`.

User mistakes (a bad config key, a missing file, a corrupted shard) end with one
line on stderr, `gigatrain: error: ...`, and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """Raised instead of argparse's exit, so every bad input ends the same way."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _fail(message: str) -> int:
    print(f"gigatrain: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# -- prepare --------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> int:
    from gigatrain.data.prepare import prepare

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
    import signal

    from gigatrain.train.trainer import resolve_run_config, train

    cfg = resolve_run_config(args.config, overrides)
    result = train(cfg)
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[result.stopped_by].value
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


def build_parser() -> Parser:
    parser = Parser(prog="gigatrain", description="Train GPT-style language models, from one CPU to thousands of GPUs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("prepare", help="tokenize text into token shards plus a manifest")
    p.add_argument("sources", nargs="+", help="text files, folders, globs, .jsonl or .parquet files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val", nargs="+", default=None, help="explicit validation sources (default: split by document)")
    p.add_argument("--tokenizer", default="bpe", help="byte, bpe (trained on the data) or a path to a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
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
                             + ("; config overrides are written --section.key=value" if args.command == "train" else ""))
        if overrides and args.command != "train":
            raise UsageError(f"gigatrain {args.command}: config overrides such as {overrides[0]} apply to `gigatrain train` only")
        if args.command == "train":
            return cmd_train(args, overrides)
        return {"prepare": cmd_prepare, "eval": cmd_eval, "generate": cmd_generate, "report": cmd_report}[args.command](args)
    except UsageError as err:
        print(f"{err}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, DataError, CheckpointError) as err:
        return _fail(str(err))
    except FileNotFoundError as err:
        return _fail(f"{err.filename}: no such file or directory")


def main() -> None:
    sys.exit(run(sys.argv[1:]))

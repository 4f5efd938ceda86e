"""Trainer overhead over a bare PyTorch loop, measured side by side in one process.

The same model shape, initial weights, batches and optimizer run through (a) a bare
loop — forward, cross-entropy, backward, clip, AdamW step — fed pre-made batches, and
(b) gigatrain's Trainer, which also draws its batches from the data loader, sets the
learning rate, writes metrics.jsonl and updates the progress display every step. The
two alternate for several rounds so that machine noise hits both alike.

    python bench/trainer_overhead.py [--steps 40] [--rounds 3] [--preset cpu-small]

The last line ends with the throughput ratio, trainer over bare loop (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gigatrain.config import load_config, resolve_model_args
from gigatrain.models.transformer import Transformer
from gigatrain.data.source import open_data
from gigatrain.rundir import RunDir
from gigatrain.train.trainer import Trainer


def bare_loop(cfg, batches) -> float:
    """Tokens per second of a plain PyTorch loop, timed from the end of the first step."""
    t = cfg.train
    model = Transformer(resolve_model_args(cfg, vocab_size=open_data(cfg).vocab_size), seed=t.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                  weight_decay=t.weight_decay, fused=True)
    ends = []
    for inputs, targets in batches:
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        ends.append(time.perf_counter())
    return (len(ends) - 1) * t.batch_size * cfg.data.seq_len / (ends[-1] - ends[0])


def trainer_loop(cfg) -> float:
    """Tokens per second of the Trainer, from the wall-clock stamps of its metrics lines."""
    Trainer(cfg).run()
    stamps = [r["time"] for r in RunDir(cfg.run_dir).metrics_records() if "loss" in r]
    return (len(stamps) - 1) * cfg.train.batch_size * cfg.data.seq_len / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        def config(round_index: int):
            return load_config(None, [
                f"--model.preset={args.preset}", f"--data.seq_len={args.seq_len}",
                f"--train.batch_size={args.batch_size}", f"--train.max_steps={args.steps}",
                "--train.eval_every=1000000", "--train.checkpoint_every=1000000", "--train.samples=0",
                "--train.eval_batches=1", "--train.progress=plain", "--train.grad_clip=1.0",
                # The bare loop's optimizer: this measures the trainer, not cpu-small's Muon recipe.
                "--train.optimizer=adamw",
                f"--run.dir={Path(tmp) / f'run{round_index}'}",
            ])

        cfg = config(0)
        loader_data = open_data(cfg)
        from gigatrain.data.loader import BatchLoader

        loader = BatchLoader(loader_data.split("train"), cfg.data.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
        batches = [loader.next_batch() for _ in range(args.steps)]
        ratios = []
        for round_index in range(args.rounds):
            # Alternate which goes first so that drifts in machine load do not favour one side.
            if round_index % 2 == 0:
                bare = bare_loop(cfg, batches)
                trainer = trainer_loop(config(round_index))
            else:
                trainer = trainer_loop(config(round_index))
                bare = bare_loop(cfg, batches)
            ratios.append(trainer / bare)
            print(f"round {round_index + 1}: bare {bare:,.0f} tok/s, trainer {trainer:,.0f} tok/s, ratio {trainer / bare:.3f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"batch {args.batch_size}x{args.seq_len}, {args.steps} steps x {args.rounds} rounds")
    print(f"trainer/bare throughput ratio (median of {args.rounds}): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()

"""Speedrun of the default CPU recipe: held-out bits per byte after a fixed wall-clock budget.

Trains the default recipe (the same config as a bare `gigatrain train`, plus any
--section.key=value overrides given here) on the default corpus — the Python standard
library's sources — for `--seconds` of training, then evaluates bits per byte on the
whole held-out split. The step count is set from a short measurement of the step time,
so the learning-rate schedule completes inside the budget; `train.time_limit_s` backs
it up.

    python bench/speedrun.py --seconds 180 [--train.lr=2e-3 ...]

The last line ends with the held-out bits per byte; the line before it gives the held-out loss
per token. `--eval-batches K` evaluates only the split's first K batches of 16 windows, for
models too big to evaluate the whole split on a CPU (gpt2-124m: about 12 minutes of forward
passes on 2 cores); its bits per byte then use the split's mean bytes per token.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from gigatrain.config import load_config
from gigatrain.data.loader import eval_batches
from gigatrain.train.evaluate import mean_loss
from gigatrain.train.trainer import Trainer


def measure_step_time(overrides: list[str], tmp: Path, steps: int = 12) -> float:
    """A low quantile of a dozen step times after two warm-up steps: a busy neighbour only ever
    slows a step down, so the faster steps are the truer measure of what the run will see."""
    cfg = load_config(None, [*overrides, f"--run.dir={tmp / 'probe'}"])
    trainer = Trainer(cfg)
    times = []
    for _ in range(steps + 2):
        inputs, targets = trainer.loader.next_batch()
        start = time.perf_counter()
        trainer.train_step(inputs, targets, lr=cfg.train.lr)
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[steps // 4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="training budget, wall clock")
    parser.add_argument("--steps", type=int, default=0,
                        help="train exactly this many steps instead (no time limit): reproducible comparisons on a busy machine")
    parser.add_argument("--eval-batches", type=int, default=0,
                        help="evaluate the held-out split's first K batches of 16 windows only (0: all of it)")
    args, overrides = parser.parse_known_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.steps:
            max_steps, limit = args.steps, 0.0
        else:
            step_time = measure_step_time(overrides, Path(tmp))
            # Evaluations inside the run also take time: budget the steps to leave room for them.
            max_steps, limit = max(10, int(0.95 * args.seconds / step_time)), args.seconds
            print(f"step time {step_time * 1000:.0f} ms -> max_steps {max_steps} for {args.seconds:.0f} s")
        cfg = load_config(None, [*overrides, f"--train.max_steps={max_steps}", f"--train.time_limit_s={limit}",
                                 f"--run.dir={Path(tmp) / 'run'}", "--train.samples=0", "--train.progress=plain"])
        start = time.perf_counter()
        trainer = Trainer(cfg)
        result = trainer.run()
        elapsed = time.perf_counter() - start
        split = trainer.data.split("val")
        eval_windows = (split.num_tokens - 1) // cfg.data.seq_len
        if args.eval_batches:
            eval_windows = min(eval_windows, 16 * args.eval_batches)
        loss = mean_loss(trainer.model, eval_batches(split, cfg.data.seq_len, 16, args.eval_batches or None),
                         trainer.device, trainer.dtype)
        bpb = loss / (math.log(2) * split.bytes_per_token)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {cfg.model.preset}, "
          f"{result.step} steps ({result.stopped_by}), {elapsed:.0f} s incl. evals and checkpoint, "
          f"{result.step * trainer.tokens_per_step:,} tokens, held-out {split.num_tokens:,} tokens")
    budget = f"{args.steps} steps" if args.steps else f"{args.seconds:.0f}s"
    print(f"held-out loss {loss:.4f} nats per token over {eval_windows * cfg.data.seq_len:,} tokens")
    print(f"speedrun {budget}: held-out bits per byte {bpb:.4f}")


if __name__ == "__main__":
    main()

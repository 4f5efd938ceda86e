"""Fresh, short CPU training runs of gigatrain itself, for calibrating the planner.

Used by test_calibration.py; also runnable to regenerate the figures in docs/planner.md:
    python tests/plan/app/cpu_runs.py /tmp/cpu-runs && gigatrain plan --calibrate /tmp/cpu-runs/*
"""

from __future__ import annotations

import sys
from pathlib import Path

TINY_4L = ["--model.n_layers=4", "--model.d_model=128", "--model.ffn_hidden=384"]
# Different model sizes, sequence lengths, batch sizes, micro-batching and recompute; one process each
# (multi-process layouts arrive with the parallel trainer).
RUNS = {
    "tiny-s64-b8": ["--data.seq_len=64", "--train.batch_size=8"],
    "tiny-s128-b16": ["--data.seq_len=128", "--train.batch_size=16"],
    "l4d128-s64-b8": TINY_4L + ["--data.seq_len=64", "--train.batch_size=8"],
    "l2d256-s128-b8": ["--model.d_model=256", "--model.ffn_hidden=768", "--data.seq_len=128", "--train.batch_size=8"],
    "tiny-s64-b32-mbs8": ["--data.seq_len=64", "--train.batch_size=32", "--train.micro_batch_size=8"],
    "l4d128-s128-b8-recompute": TINY_4L + ["--data.seq_len=128", "--train.batch_size=8",
                                           "--train.activation_checkpointing=full"],
}
COMMON = ["--model.preset=tiny", "--data.tokenizer=byte", "--train.max_steps=14", "--train.eval_batches=1",
          "--train.eval_every=1000", "--train.checkpoint_every=1000", "--train.samples=0", "--train.progress=off"]


def make_runs(root: Path, names: list[str] | None = None) -> list[Path]:
    """Train each run in this process (one import of torch for all), on one thread: with other
    jobs on the machine, two threads spin against each other and the timings become noise."""
    import torch

    from gigatrain.config import load_config
    from gigatrain.train.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dirs = []
        for name in names or list(RUNS):
            run_dir = Path(root) / name
            train(load_config(None, COMMON + RUNS[name] + [f"--run.dir={run_dir}"]))
            dirs.append(run_dir)
        return dirs
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    for path in make_runs(Path(sys.argv[1])):
        print(path)

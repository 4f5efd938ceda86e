"""Training stall per checkpoint: asynchronous save against a synchronous save of the same state.

The model of a preset with its AdamW state (the state a training checkpoint holds) is saved
through gigatrain's Checkpointer alternately (a) synchronously: training waits for the files
to be written, checksummed and committed; and (b) asynchronously: training waits only for
the copy of the state into host memory, then goes on while a background thread writes,
checksums and commits. During each async write the benchmark keeps training (forward,
backward, AdamW step) and counts the steps it made before the commit landed.

    python bench/checkpoint_stall.py [--preset gpt2-124m] [--rounds 3] [--dir DIR]

The last line ends with the ratio of the async stall to the synchronous save (lower is better).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gigatrain.checkpoint import dcp as checkpoint
from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import Transformer


def train_step(model, optimizer, inputs) -> None:
    logits = model(inputs)
    F.cross_entropy(logits.flatten(0, 1).float(), inputs.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_bytes(model, optimizer) -> int:
    tensors = list(model.state_dict().values()) + [t for s in optimizer.state.values() for t in s.values()
                                                  if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="default: llama3-1b on a GPU, gpt2-124m on a CPU")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("llama3-1b" if device.type == "cuda" else "gpt2-124m")
    with torch.device(device):
        model = Transformer(get_preset(preset), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = torch.randint(0, model.args.vocab_size, (1, args.seq_len), device=device)
    train_step(model, optimizer, inputs)  # AdamW's state exists from the first step
    gigabytes = state_bytes(model, optimizer) / 1e9
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{preset} on {name}: {gigabytes:.2f} GB of weights and AdamW state per checkpoint; torch {torch.__version__}")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sync_saver = checkpoint.Checkpointer(Path(tmp) / "sync", keep=1, async_save=False)
        async_saver = checkpoint.Checkpointer(Path(tmp) / "async", keep=1, async_save=True)
        sync_s, stall_s, write_s, overlapped = [], [], [], []
        for round_ in range(args.rounds + 1):  # round 0 warms up (allocation, pinned buffers, file cache)
            step = 100 * (round_ + 1)
            started = time.perf_counter()
            sync_saver.save(step, [model], [optimizer], {"step": step})
            assert sync_saver.wait(), "the synchronous save failed"
            sync = time.perf_counter() - started

            started = time.perf_counter()
            stall = async_saver.save(step, [model], [optimizer], {"step": step})
            steps = 0
            while not async_saver._pending.done():  # train while the checkpoint is written
                train_step(model, optimizer, inputs)
                steps += 1
            assert async_saver.wait(), "the asynchronous save failed"
            write = time.perf_counter() - started
            if round_ == 0:
                continue
            sync_s.append(sync)
            stall_s.append(stall)
            write_s.append(write)
            overlapped.append(steps)
            print(f"round {round_}: sync save {sync:.3f} s | async: stall {stall:.3f} s, committed after {write:.3f} s, "
                  f"{steps} training steps meanwhile")
        sync_saver.close()
        async_saver.close()
    sync, stall = statistics.median(sync_s), statistics.median(stall_s)
    print(f"median of {args.rounds}: sync save {sync:.3f} s ({gigabytes / sync:.2f} GB/s); async stall {stall:.3f} s, "
          f"written in the background in {statistics.median(write_s):.3f} s while training ran "
          f"{statistics.median(overlapped):.0f} steps")
    print(f"checkpoint stall, async over sync save of the same {gigabytes:.2f} GB: {stall / sync:.3f}")


if __name__ == "__main__":
    main()

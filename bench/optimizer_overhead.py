"""Step time of Muon over AdamW, under FSDP2 (DTensor parameters), side by side in one process.

The same model, batches and FSDP2 sharding (over a one-rank mesh, so the parameters and
gradients are DTensors and Muon takes its distributed path) train with gigatrain's
`build_optimizer` for `train.optimizer=adamw` and `muon`, alternating for several rounds so
that noise hits both alike; each step is forward, backward, clip and optimizer step, and the
optimizer step alone is timed too (synchronised). On a GPU: bf16 compute, fp32 master weights
and gradients, Newton–Schulz in bf16 — the trainer's settings.

    python bench/optimizer_overhead.py                 # llama3-1b on one GPU, 8 x 4 x 2048 tokens per step (< 90 s on an H100)
    python bench/optimizer_overhead.py --smoke         # a tiny model on CPU: checks the script

The last line ends with Muon's step-time overhead over AdamW in percent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from gigatrain.config import load_config, resolve_model_args
from gigatrain.models.loss import loss_fn
from gigatrain.models.transformer import Transformer
from gigatrain.parallel import apply_compile
from gigatrain.parallel.fsdp import apply_fsdp
from gigatrain.train.optim import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(optimizer_name: str, args, device: torch.device, mesh, batches) -> tuple[list[float], list[float]]:
    """Step and optimizer-step seconds of `args.steps` steps after two warm-up steps (the same
    `batches`, accumulated, at every step: the timing does not depend on the numbers)."""
    cfg = load_config(None, [f"--model.preset={args.preset}", f"--model.vocab_size={args.vocab}",
                             f"--train.optimizer={optimizer_name}", f"--data.seq_len={args.seq}"])
    with torch.device(device):
        model = Transformer(resolve_model_args(cfg, vocab_size=args.vocab), seed=0)
    if args.compile:
        apply_compile(model)
    apply_fsdp(model, mesh, param_dtype=torch.bfloat16 if device.type == "cuda" else None, reshard_after_forward=True)
    optimizer = build_optimizer(model, cfg.train, device)
    steps, optimizer_steps = [], []
    for i in range(args.steps + 2):
        sync(device)
        start = time.perf_counter()
        for inputs, targets in batches:  # gradient accumulation: --accum micro-batches per step
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(inputs), targets) / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sync(device)
        before_step = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        end = time.perf_counter()
        if i >= 2:  # warm-up: compilation, allocator, the optimizer's state
            steps.append(end - start)
            optimizer_steps.append(end - before_step)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return steps, optimizer_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script)")
    parser.add_argument("--preset", default="llama3-1b")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and optimizer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="compile each block, as train.compile does")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch, args.seq, args.accum, args.steps, args.rounds = "tiny", 4, 64, 2, 3, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.vocab = 128256 if args.preset.startswith("llama3") else 256
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    generator = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
                     for _ in range(2)) for _ in range(args.accum)]
    times = {"adamw": ([], []), "muon": ([], [])}
    for _ in range(args.rounds):
        for name in times:
            steps, optimizer_steps = run(name, args, device, mesh, batches)
            times[name][0].extend(steps)
            times[name][1].extend(optimizer_steps)
    dist.destroy_process_group()
    label = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.preset}, {args.accum} x {args.batch} x {args.seq} tokens per step, FSDP2 over 1 rank, {label}, "
          f"torch {torch.__version__}, compile={args.compile}")
    median = {name: (statistics.median(s), statistics.median(o)) for name, (s, o) in times.items()}
    for name, (step, optimizer_step) in median.items():
        print(f"{name:6s} step {step * 1e3:9.1f} ms   optimizer step {optimizer_step * 1e3:8.1f} ms (median)")
    overhead = (median["muon"][0] / median["adamw"][0] - 1) * 100
    print(f"muon step-time overhead over adamw: {overhead:.1f}%")


if __name__ == "__main__":
    main()

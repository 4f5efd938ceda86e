"""MoE training throughput against the dense model with the same active parameters, side by side in one process.

The dense model is a preset (default cpu-small); the MoE model is the same with each
feed-forward replaced by `--experts` experts of which each token uses `--top-k`, each of
hidden ffn_hidden / top_k: a token goes through as many expert weights as the dense model's
feed-forward holds (the router, d_model x experts per layer, is the only extra active
parameter). Both train (forward, loss, backward, clip, AdamW step) on the same random
batches. Each round runs one step of each, alternately, so that machine noise (other
processes on a shared machine) hits both alike; each model's figure is its median step over
the rounds, after two warm-up steps. `--profile` adds the MoE step's busiest operators.

    python bench/moe.py [--preset cpu-small] [--experts 8] [--top-k 2] [--rounds 30]

The last line ends with the ratio of throughputs, MoE over dense (1.0 = MoE costs nothing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from gigatrain.models.flops import param_counts
from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import Transformer


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """Seconds of one training step on `tokens` [batch, seq + 1]."""
    started = time.perf_counter()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="print the MoE step's busiest operators")
    args = parser.parse_args()

    dense_args = replace(get_preset(args.preset), max_seq_len=args.seq_len)
    if dense_args.ffn_hidden % args.top_k:
        parser.error(f"--top-k={args.top_k} does not divide the preset's ffn_hidden {dense_args.ffn_hidden}; pick a divisor")
    moe_args = replace(dense_args, n_experts=args.experts, top_k=args.top_k, expert_hidden=dense_args.ffn_hidden // args.top_k)
    models = {name: Transformer(model_args, seed=0) for name, model_args in (("dense", dense_args), ("moe", moe_args))}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) for name, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(dense_args.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
               for _ in range(args.rounds + 2)]
    for name, model_args in (("dense", dense_args), ("moe", moe_args)):
        counts = param_counts(model_args)
        print(f"{name}: {counts.total / 1e6:.2f}M parameters, {counts.active / 1e6:.2f}M active")

    seconds: dict[str, list[float]] = {"dense": [], "moe": []}
    for round_, tokens in enumerate(batches):
        for name in ("dense", "moe") if round_ % 2 else ("moe", "dense"):
            seconds[name].append(train_step(models[name], optimizers[name], tokens))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for tokens in batches[:3]:
                train_step(models["moe"], optimizers["moe"], tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    tokens = args.batch_size * args.seq_len
    dense, moe = (tokens / statistics.median(seconds[name][2:]) for name in ("dense", "moe"))
    print(f"{args.preset}, batch {args.batch_size} x {args.seq_len}, {args.experts} experts top-{args.top_k}, "
          f"median step of {args.rounds} rounds, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"dense {dense:,.0f} tokens/s, MoE {moe:,.0f} tokens/s; MoE/dense throughput: {moe / dense:.2f}")


if __name__ == "__main__":
    main()

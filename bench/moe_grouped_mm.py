"""The experts' two paths on one MoE layer: a loop over the experts against one grouped matmul
per projection (`torch._grouped_mm`), forward + backward on CUDA in bf16, and whether the grouped
path syncs with the host and how torch.compile traces it.

    python bench/moe_grouped_mm.py [--tokens 8192]

Layers: Mixtral-8x7B's (8 experts of 14336, top-2) and Qwen3-30B-A3B's (128 experts of 768,
top-8). Needs a CUDA GPU of compute capability 9.0 or more (Hopper).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch

from gigatrain.models.moe import GroupedExperts, MoE, grouped_mm_runs
from gigatrain.models.transformer import ModelArgs

LAYERS = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}


def layer(n_experts: int, top_k: int, d_model: int, hidden: int) -> MoE:
    args = ModelArgs(n_layers=1, d_model=d_model, n_heads=1, n_kv_heads=1, ffn_hidden=hidden, vocab_size=8,
                     max_seq_len=8, n_experts=n_experts, top_k=top_k, expert_hidden=hidden)
    torch.manual_seed(0)
    moe = MoE(args).cuda()
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0, 0.02)
    return moe.bfloat16()


def milliseconds(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    tokens = parser.parse_args().tokens
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("bench/moe_grouped_mm.py: needs a CUDA GPU of compute capability 9.0 or more", file=sys.stderr)
        sys.exit(2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {tokens} tokens, bf16, forward + backward")
    for name, (n_experts, top_k, d_model, hidden) in LAYERS.items():
        moe = layer(n_experts, top_k, d_model, hidden)
        x = torch.randn(tokens, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        times = {}
        for grouped in (False, True):
            moe.experts.forward = partial(GroupedExperts.forward, moe.experts, grouped=grouped)
            times[grouped] = milliseconds(lambda: moe(x).sum().backward())
        print(f"{name} layer: loop {times[False]:.1f} ms, grouped {times[True]:.1f} ms ({times[False] / times[True]:.1f}x)")
        del moe, x
        torch.cuda.empty_cache()

    moe = layer(8, 2, 256, 512)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    assert grouped_mm_runs(x, 512)
    counts = torch.bincount(torch.randint(0, 8, (tokens,), device="cuda"), minlength=8)
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    moe.experts(x, counts)
    torch.cuda.set_sync_debug_mode(0)
    print("grouped experts: no host sync")
    explained = torch._dynamo.explain(moe)(x)
    print(f"torch.compile of the layer: {explained.graph_break_count} graph break(s): "
          + "; ".join(str(b.reason).splitlines()[0] for b in explained.break_reasons))


if __name__ == "__main__":
    main()

"""Run inside the parallel layouts job (layouts_worker.py, 4 processes): the expert-parallel
dispatch/combine round trip against a plain per-token reference, for random routings.

For ep=4 and ep=2 (two EP groups side by side), several trials each: every rank routes its own
random tokens (some ranks none, some experts none, once every token to one expert) through
an expert-parallel GroupedExperts and through the same weights whole in one process. Written
to RUN_DIR/dispatch_rank<R>.json: per case the largest differences of the outputs, of the
inputs' gradients and of the weights' gradients (each expert's summed over its EP group, as
the parallel backward sums them before dividing by ep)."""

import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from gigatrain.models.moe import GroupedExperts
from gigatrain.parallel.expert import make_expert_parallel

N_EXPERTS, D_MODEL, HIDDEN = 8, 16, 24


def routing(trial: int, rank: int) -> torch.Tensor:
    """Each of this rank's tokens' expert: random counts and experts, with edge cases."""
    g = torch.Generator().manual_seed(100 * trial + rank)
    if trial == 0:
        return torch.full((5,), 3)  # every token of every rank to one expert
    if trial == 1 and rank == 1:
        return torch.zeros(0, dtype=torch.int64)  # a rank with no tokens at all
    used = torch.randperm(N_EXPERTS, generator=g)[: int(torch.randint(1, N_EXPERTS + 1, (1,), generator=g))]
    n_tokens = int(torch.randint(0, 40, (1,), generator=g))
    return used[torch.randint(0, len(used), (n_tokens,), generator=g)]


def per_token(experts: GroupedExperts, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Each token through its expert, one token at a time: the plainest reference."""
    rows = [(F.silu(t @ experts.w1[e].T) * (t @ experts.w3[e].T)) @ experts.w2[e].T for t, e in zip(x, chosen.tolist())]
    if rows:
        return torch.stack(rows)
    # No tokens: no output, and zero gradients (the weights are still part of the graph).
    return x.new_zeros(0, D_MODEL) + 0 * sum(w.sum() for w in experts.parameters())


def check_ep_dispatch(run_dir: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for ep in (4, 2):
        mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("rest", "ep"))["ep"]
        for trial in range(5):
            torch.manual_seed(trial)  # the same whole weights on every rank
            whole = GroupedExperts(N_EXPERTS, D_MODEL, HIDDEN, "silu")
            for w in whole.parameters():
                torch.nn.init.normal_(w, std=0.3)
            parallel = copy.deepcopy(whole)
            make_expert_parallel(parallel, mesh)
            chosen = routing(trial, rank)
            g = torch.Generator().manual_seed(1000 + 100 * trial + rank)
            x = torch.randn(len(chosen), D_MODEL, generator=g)
            probe = torch.randn(len(chosen), D_MODEL, generator=g)
            order = chosen.argsort(stable=True)
            counts = torch.bincount(chosen, minlength=N_EXPERTS)
            x_parallel, x_ref = x[order].clone().requires_grad_(), x[order].clone().requires_grad_()
            out = parallel(x_parallel, counts)
            expected = per_token(whole, x_ref, chosen[order])
            (out * probe[order]).sum().backward()
            (expected * probe[order]).sum().backward()
            case = {"ep": ep, "trial": trial, "tokens": len(chosen),
                    "out": (out - expected).abs().max().item() if len(chosen) else 0.0,
                    "x_grad": (x_parallel.grad - x_ref.grad).abs().max().item() if len(chosen) else 0.0}
            local = N_EXPERTS // ep
            first = mesh.get_local_rank() * local
            for name in ("w1", "w2", "w3"):
                summed = getattr(whole, name).grad.clone()
                dist.all_reduce(summed, group=mesh.get_group())  # the EP group's tokens, summed
                # ... and divided by ep (FSDP's mean over the remaining ranks makes it the mean over all).
                got = getattr(parallel, name).grad.to_local() * ep
                case[f"{name}_grad"] = (got - summed[first:first + local]).abs().max().item()
                case["scale"] = max(case.get("scale", 0.0), summed.abs().max().item())
            results.append(case)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"dispatch_rank{rank}.json").write_text(json.dumps(results))

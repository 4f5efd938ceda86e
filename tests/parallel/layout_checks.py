"""Checks run inside the parallel layouts job (layouts_worker.py, 4 processes, gloo) besides the
training runs, each writing its measurements to RUN_DIR/<check>_rank<R>.json for the tests to
judge. They share the job's process group: a torchrun job of their own would cost its start,
imports and rendezvous again.

ep_dispatch (tests/parallel/test_moe_layouts.py): the expert-parallel dispatch/combine round
trip against a plain per-token reference, for random routings. For ep=4 and ep=2 (two EP groups
side by side), several trials each: every rank routes its own random tokens (some ranks none,
some experts none, once every token to one expert) through an expert-parallel GroupedExperts
and through the same weights whole in one process; per case the largest differences of the
outputs, of the inputs' gradients and of the weights' gradients (each expert's summed over its
EP group, as the parallel backward sums them before dividing by ep).

muon_shards (tests/parallel/test_muon.py): the owner-rank orthogonalisation of sharded matrices
against orthogonalising each whole matrix, for rows and columns split unevenly and a last batch
padded (6 matrices over 4 ranks).

qk_norm_tp (tests/parallel/test_qk_norm_tp.py): a tiny QK-norm model under tensor + sequence
parallelism (tp=2, two groups side by side) against the same model in one process, forward and
backward."""

import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from gigatrain.models.moe import GroupedExperts
from gigatrain.models.presets import get_preset, with_overrides
from gigatrain.models.transformer import Transformer
from gigatrain.parallel.expert import make_expert_parallel
from gigatrain.parallel.muon import orthogonalize, orthogonalized_shards
from gigatrain.parallel.tensor import apply_tp

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
    write(run_dir, "ep_dispatch", results)


def write(run_dir: Path, check: str, results) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{check}_rank{dist.get_rank()}.json").write_text(json.dumps(results))


def check_muon_shards(run_dir: Path) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    wholes = [torch.randn(shape) for shape in [(10, 7), (10, 7), (7, 10), (10, 7), (10, 7), (13, 3)]]
    results = []
    for dim in (0, 1):
        likes = [distribute_tensor(whole, mesh, [Shard(dim)]) for whole in wholes]
        got = orthogonalized_shards([like.to_local() for like in likes], likes, torch.float32)
        for whole, shard in zip(wholes, got):
            expected = distribute_tensor(orthogonalize(whole, torch.float32), mesh, [Shard(dim)]).to_local()
            results.append({"dim": dim, "shape": list(whole.shape), "equal": torch.equal(shard, expected),
                            "difference": (shard - expected).abs().max().item() if shard.numel() else 0.0})
    write(run_dir, "muon_shards", results)


def check_qk_norm_tp(run_dir: Path) -> None:
    args = with_overrides(get_preset("tiny"), qk_norm=True, tie_embeddings=False)
    model = Transformer(args, seed=3)
    with torch.no_grad():  # gains apart from 1 and from each other, so a mixed-up head shows
        for name, param in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    sharded = copy.deepcopy(model)
    tp_mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("rest", "tp"))["tp"]
    apply_tp(sharded, tp_mesh)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    probe = torch.randn(2, 16, args.vocab_size, generator=torch.Generator().manual_seed(1))
    (model(tokens) * probe).sum().backward()
    logits = sharded(tokens).full_tensor()
    (logits * probe).sum().backward()
    report = {"logits": (logits - model(tokens)).abs().max().item(), "grads": {}, "norm_placements": []}
    reference = dict(model.named_parameters())
    for name, param in sharded.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        scale = reference[name].grad.abs().max().item()
        report["grads"][name] = (grad - reference[name].grad).abs().max().item() / max(scale, 1e-12)
        if "q_norm" in name or "k_norm" in name:
            report["norm_placements"].append(isinstance(param, DTensor) and param.placements == (Replicate(),))
    write(run_dir, "qk_norm_tp", report)


CHECKS = {"ep_dispatch": check_ep_dispatch, "muon_shards": check_muon_shards, "qk_norm_tp": check_qk_norm_tp}

"""Run by test_qk_norm_tp.py under torchrun (2 processes, gloo): a tiny QK-norm model under
tensor + sequence parallelism against the same model in one process, forward and backward."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate

from gigatrain.models.presets import get_preset, with_overrides
from gigatrain.models.transformer import Transformer
from gigatrain.parallel.tensor import apply_tp


def main(out: str) -> None:
    dist.init_process_group("gloo")
    args = with_overrides(get_preset("tiny"), qk_norm=True, tie_embeddings=False)
    model = Transformer(args, seed=3)
    with torch.no_grad():  # gains apart from 1 and from each other, so a mixed-up head shows
        for name, param in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    sharded = copy.deepcopy(model)
    apply_tp(sharded, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
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
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

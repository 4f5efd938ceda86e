"""MoE.forward's dispatch and combine (gathers with gathered backwards) against a per-token reference."""

import torch

from gigatrain.models.moe import MoE
from gigatrain.models.presets import get_preset


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through its k experts one by one, weighted by its router weights."""
    weights, chosen, _ = moe.router(x)
    act, e = moe.experts.activation, moe.experts
    rows = []
    for token, (token_weights, token_experts) in enumerate(zip(weights, chosen)):
        out = 0
        for w, k in zip(token_weights, token_experts.tolist()):
            out = out + w * ((act(x[token] @ e.w1[k].T) * (x[token] @ e.w3[k].T)) @ e.w2[k].T)
        rows.append(out)
    return torch.stack(rows)


def test_forward_and_gradients_equal_a_per_token_loop():
    args = get_preset("tiny-moe")
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.router.expert_bias.normal_(std=0.1)  # the bias only chooses; tested with one that matters
    x = torch.randn(2, 24, args.d_model, requires_grad=True)
    out = moe(x)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn_like(out)
    ref = reference(moe, x_ref.view(-1, args.d_model)).view_as(out)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(out, [x, *moe.parameters()], grad)
    expected = torch.autograd.grad(ref, [x_ref, *moe.parameters()], grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

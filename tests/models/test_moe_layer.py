"""The MoE layer against a plain per-token reference, and its two expert paths (one grouped
matmul per projection, or a loop over the experts) against each other: values and gradients."""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gigatrain.models.moe import GroupedExperts, MoE, grouped_mm_runs
from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import FeedForward, ModelArgs, Transformer


def moe_layer(n_experts, top_k, score, route_norm, shared, activation="silu", d_model=16, hidden=12, seed=0):
    args = ModelArgs(n_layers=1, d_model=d_model, n_heads=1, n_kv_heads=1, ffn_hidden=hidden, vocab_size=8, max_seq_len=8,
                     n_experts=n_experts, top_k=top_k, expert_hidden=hidden, n_shared_experts=shared,
                     router_score=score, route_norm=route_norm, mlp_activation=activation)
    torch.manual_seed(seed)
    moe = MoE(args, FeedForward(args, hidden * shared) if shared else None)
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0, 0.5)
    return moe


def expert_mlp(moe: MoE, expert: int, x: torch.Tensor) -> torch.Tensor:
    e = moe.experts
    return (e.activation(x @ e.w1[expert].T) * (x @ e.w3[expert].T)) @ e.w2[expert].T


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: score the experts, take the top_k (by score + bias), sum weight * expert MLP."""
    outputs = []
    for token in x:
        logits = moe.router.gate.weight @ token
        scores = logits.softmax(-1) if moe.router.score_fn == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores + moe.router.expert_bias, moe.top_k).indices
        weights = scores[chosen]
        if moe.router.route_norm:
            weights = weights / weights.sum()
        out = sum(w * expert_mlp(moe, int(e), token) for w, e in zip(weights, chosen))
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(token)
        outputs.append(out)
    return torch.stack(outputs)


def grads(moe: MoE, x: torch.Tensor, out: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(moe.named_parameters())
    values = torch.autograd.grad((out * probe).sum(), [x, *params.values()], allow_unused=True)
    return {"x": values[0], **{name: g for name, g in zip(params, values[1:]) if g is not None}}


def force_grouped(moe: MoE, grouped: bool) -> None:
    """Run this layer's experts down one path, whatever the device."""
    moe.experts.forward = partial(GroupedExperts.forward, moe.experts, grouped=grouped)


@st.composite
def routings(draw):
    n_experts = draw(st.integers(2, 6))
    return dict(n_experts=n_experts, top_k=draw(st.integers(1, n_experts)), score=draw(st.sampled_from(["softmax", "sigmoid"])),
                route_norm=draw(st.booleans()), shared=draw(st.sampled_from([0, 1, 2])),
                activation=draw(st.sampled_from(["silu", "gelu"])), seed=draw(st.integers(0, 2**16)),
                tokens=draw(st.integers(1, 12)),
                # Experts pushed out of every top_k by their bias: they get no tokens.
                shunned=draw(st.lists(st.integers(0, n_experts - 1), max_size=2, unique=True)))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(routings())
def test_moe_equals_the_per_token_reference_and_both_expert_paths_agree(case):
    moe = moe_layer(case["n_experts"], case["top_k"], case["score"], case["route_norm"], case["shared"], case["activation"], seed=case["seed"])
    if case["top_k"] + len(case["shunned"]) <= case["n_experts"]:
        moe.router.expert_bias[case["shunned"]] = -10.0  # scores lie in [0, 1]: never chosen
    generator = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["tokens"], moe.router.gate.in_features, generator=generator, requires_grad=True)
    probe = torch.randn(case["tokens"], x.shape[1], generator=generator)
    expected = reference(moe, x)
    expected_grads = grads(moe, x, expected, probe)
    results = {}
    for grouped in (False, True):
        force_grouped(moe, grouped)
        out = moe(x)
        results[grouped] = out, grads(moe, x, out, probe)
        # The reference sums in another order: fp32 rounding of values up to ~10.
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for name, grad in results[grouped][1].items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    loop, grouped = results[False], results[True]
    torch.testing.assert_close(grouped[0], loop[0], rtol=1e-6, atol=1e-6)
    # The grouped backward sums the weight gradients in its own order: fp32 rounding.
    for name in loop[1]:
        torch.testing.assert_close(grouped[1][name], loop[1][name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1.6e-2)])
def test_grouped_matmul_equals_the_loop_with_empty_experts(dtype, tolerance):
    torch.manual_seed(0)
    experts = GroupedExperts(5, 16, 24, "silu")
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.3)
    experts = experts.to(dtype)
    counts = torch.tensor([3, 0, 9, 0, 1])  # unaligned group sizes, experts with no token
    x = torch.randn(int(counts.sum()), 16, dtype=dtype, requires_grad=True)
    probe = torch.randn(x.shape, dtype=dtype)
    results = []
    for grouped in (False, True):
        out = experts(x, counts, grouped=grouped)
        values = torch.autograd.grad((out.float() * probe.float()).sum(), [x, *experts.parameters()])
        results.append((out, values))
    (loop, loop_grads), (grouped, grouped_grads) = results
    torch.testing.assert_close(grouped, loop, rtol=tolerance, atol=tolerance)
    for a, b in zip(grouped_grads, loop_grads):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_the_grouped_path_is_chosen_only_where_it_is_fast():
    assert not grouped_mm_runs(torch.zeros(4, 64), 96)  # CPU, fp32
    assert not grouped_mm_runs(torch.zeros(4, 64, dtype=torch.bfloat16), 96)  # CPU: torch's own loop, slower
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        assert grouped_mm_runs(torch.zeros(4, 64, dtype=torch.bfloat16, device="cuda"), 96)
        assert not grouped_mm_runs(torch.zeros(4, 60, dtype=torch.bfloat16, device="cuda"), 96)  # rows of 120 bytes
        assert not grouped_mm_runs(torch.zeros(0, 64, dtype=torch.bfloat16, device="cuda"), 96)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_layer_runs_grouped_and_matches_the_loop():
    moe = moe_layer(8, 2, "softmax", True, 1, d_model=64, hidden=96).cuda().bfloat16()
    x = torch.randn(2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert grouped_mm_runs(x, 96) == (torch.cuda.get_device_capability() >= (9, 0))
    probe = torch.randn_like(x)
    outs = {}
    for grouped in (False, True):
        force_grouped(moe, grouped)
        out = moe(x)
        outs[grouped] = out, grads(moe, x, out, probe)
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1.6e-2, atol=1e-2)
    for name in outs[False][1]:
        torch.testing.assert_close(outs[True][1][name], outs[False][1][name], rtol=1.6e-2, atol=2e-2, msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_moe_block_equals_eager_and_trains():
    """torch.compile over a tiny-moe block: the routing's bincount (an output shape that depends on
    the data) breaks the graph, and the experts' loop (CPU) runs eager, so fullgraph=False."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-moe"))
    block = model.layers["0"]
    x = torch.randn(2, 16, 64, requires_grad=True)
    eager = block(x, model.rope_cos, model.rope_sin)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *block.parameters()])
    compiled = torch.compile(block, fullgraph=False, backend="inductor")
    out = compiled(x, model.rope_cos, model.rope_sin)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    compiled_grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

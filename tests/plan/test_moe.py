"""The planner's mixture-of-experts terms against hand-computed cases: the all-to-all, expert
memory under EP, load imbalance, active FLOPs, and layouts whose ep is valid."""

import pytest

from gigatrain.models.flops import param_counts, training_flops_per_token
from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import get_accelerator
from gigatrain.plan.costs import GB, NVLINK_LATENCY_S, Efficiency, Layout, Workload, all_to_all_time, estimate, model_costs
from gigatrain.plan.layout import Constraints, auto_layout, search, violations

# 2 MoE layers of 4 experts (hidden 16), 2 per token; d_model 8.
SMALL_MOE = ModelArgs(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, ffn_hidden=16, vocab_size=10, max_seq_len=4,
                      n_experts=4, top_k=2)
MIXTRAL = get_preset("mixtral-8x7b")  # 46.7B total, 12.9B active
H100 = get_accelerator("h100")


def test_flops_count_active_parameters_and_the_router():
    costs = model_costs(SMALL_MOE, 4)
    attention, router, expert = 192, 8 * 4, 3 * 8 * 16
    # A layer's matmul FLOPs per token: attention, the router and the token's 2 experts, not all 4.
    assert costs.layer_dense_flops == pytest.approx(6 * (attention + router + 2 * expert))
    assert costs.layer_expert_flops == pytest.approx(6 * 2 * expert)
    assert costs.layer_expert_params == 4 * expert
    assert costs.head_flops == pytest.approx(6 * 10 * 8)
    total = SMALL_MOE.n_layers * (costs.layer_dense_flops + costs.layer_attention_flops) + costs.head_flops
    assert total == pytest.approx(training_flops_per_token(SMALL_MOE, 4))
    # MFU is on active FLOPs: the same FLOPs per token as a dense model of the active size.
    counts = param_counts(MIXTRAL)
    assert counts.total == pytest.approx(46.7e9, rel=0.01) and counts.active == pytest.approx(12.9e9, rel=0.01)
    result = estimate(Workload(MIXTRAL, 4096, 64), Layout(dp_shard=64, ep=8, activation_checkpointing="full"), H100)
    assert result.mfu == pytest.approx(result.tokens_per_s * training_flops_per_token(MIXTRAL, 4096) / (64 * H100.peak_flops()))


def test_all_to_all_by_hand_inside_one_nvlink_domain():
    """4 EP ranks on one H100 node: per micro-batch and MoE layer, dispatch and combine forward
    and backward (4 all-to-alls) of tokens x top_k x d_model x 2 bytes, 3/4 of it leaving the rank."""
    eff = Efficiency()
    workload = Workload(SMALL_MOE, 4, 8)
    result = estimate(workload, Layout(dp_shard=4, ep=4, micro_batch_size=1), H100, eff)
    tokens, microbatches, moe_layers = 4, 8 // 4, 2
    sent = tokens * 2 * 8 * 2 * 3 / 4  # 96 bytes to the 3 peers
    per_op = sent / (H100.scaleup_bw_gbs * GB * eff.collective_scaleup) + NVLINK_LATENCY_S
    assert result.time_s["ep_comm"] == pytest.approx(microbatches * moe_layers * 4 * per_op)
    # Full recompute replays the forward's dispatch and combine: 6 all-to-alls.
    full = estimate(workload, Layout(dp_shard=4, ep=4, micro_batch_size=1, activation_checkpointing="full"), H100, eff)
    assert full.time_s["ep_comm"] == pytest.approx(microbatches * moe_layers * 6 * per_op)
    assert estimate(workload, Layout(dp_shard=4, ep=1), H100, eff).time_s["ep_comm"] == 0


def test_all_to_all_leaves_the_nvlink_domain_when_the_ep_group_does():
    eff = Efficiency()
    nvlink = H100.scaleup_bw_gbs * GB * eff.collective_scaleup
    fabric = H100.scaleout_bw_gbs * GB * eff.collective_scaleout
    data = 64e6  # bytes one rank routes
    inside = all_to_all_time(data, 8, 1, H100, eff)  # 8 ranks x tp 1: one node
    assert inside == pytest.approx(data * 7 / 8 / nvlink + NVLINK_LATENCY_S)
    # The same 8 EP ranks with tp=2 span 16 GPUs: 4 peers per node, 4 over InfiniBand, which sets the pace.
    across = all_to_all_time(data, 8, 2, H100, eff)
    assert across == pytest.approx(data * 4 / 8 / fabric + H100.scaleout_latency_us * 1e-6)
    # 16 ranks of tp 1: half the peers are in other nodes.
    assert all_to_all_time(data, 16, 1, H100, eff) == pytest.approx(data * 8 / 16 / fabric + H100.scaleout_latency_us * 1e-6)
    assert across > 4 * inside  # 8x slower links, 4/7 of the bytes
    # In a whole plan: ep 8 with tp 1 stays in the node, ep 8 with tp 2 does not, at the same routed bytes per GPU.
    workload = Workload(MIXTRAL, 4096, 512)
    in_node = estimate(workload, Layout(dp_shard=64, tp=1, ep=8, activation_checkpointing="full"), H100)
    # tp 2 halves the routed tokens per GPU (sequence parallel); twice the micro-batch puts them back.
    off_node = estimate(workload, Layout(dp_shard=32, tp=2, ep=8, micro_batch_size=2, activation_checkpointing="full"), H100)
    assert in_node.microbatches == off_node.microbatches
    assert off_node.time_s["ep_comm"] > 4 * in_node.time_s["ep_comm"]


def test_expert_memory_is_divided_by_ep():
    """Pipeline stages keep their bf16 weights gathered and their gradients unsharded: those hold
    the rank's 1/ep of the experts; the fp32 state is sharded over dp_shard x cp either way."""
    workload = Workload(MIXTRAL, 4096, 256)
    base = dict(dp_shard=8, pp=4, micro_batch_size=1, activation_checkpointing="full")
    one, eight = (estimate(workload, Layout(**base, ep=ep), H100).memory_gb for ep in (1, 8))
    stage_experts = 8 * MIXTRAL.n_experts * 3 * 4096 * 14336  # 8 layers per stage
    assert one["gradients"] - eight["gradients"] == pytest.approx(4 * stage_experts * 7 / 8 / GB)
    assert one["weights"] - eight["weights"] == pytest.approx(2 * stage_experts * 7 / 8 / GB)
    assert one["optimizer"] == pytest.approx(eight["optimizer"])
    # Without a pipeline, FSDP gathers one layer at a time: the gathered MoE layer holds 1/ep of its experts.
    flat_one, flat_eight = (estimate(workload, Layout(dp_shard=32, ep=ep, activation_checkpointing="full"), H100).memory_gb
                            for ep in (1, 8))
    layer_experts = MIXTRAL.n_experts * 3 * 4096 * 14336
    assert flat_one["buffers"] - flat_eight["buffers"] == pytest.approx(layer_experts * 7 / 8 * (2 * 2 + 4) / GB)


def test_routed_activations_hold_top_k_copies():
    workload = Workload(MIXTRAL, 4096, 8)
    dense = ModelArgs(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_hidden=2 * 14336, vocab_size=32000,
                      max_seq_len=32768)
    moe_act = estimate(workload, Layout(dp_shard=8, ep=8), H100).memory_gb["activations"]
    dense_act = estimate(Workload(dense, 4096, 8), Layout(dp_shard=8), H100).memory_gb["activations"]
    # The same as a dense MLP of hidden top_k x expert_hidden, plus per token and layer the top_k
    # dispatched inputs and expert outputs (2 x 2 x h) and the router's scores (2 x 8), bf16.
    extra = 32 * 4096 * (2 * 2 * 4096 + 2 * 8) * 2 / GB
    assert moe_act - dense_act == pytest.approx(extra)


def test_imbalance_slows_the_routed_experts_only_with_ep():
    workload = Workload(MIXTRAL, 4096, 64)
    layout = Layout(dp_shard=64, ep=8, activation_checkpointing="full")
    even, skewed = (estimate(workload, layout, H100, Efficiency(expert_imbalance=x)) for x in (1.0, 1.5))
    eff = Efficiency().resolve(H100)
    tokens, layers, microbatches = 4096, 32, 1
    expert_time = tokens * model_costs(MIXTRAL, 4096).layer_expert_flops * 4 / 3 / (H100.peak_flops() * eff.matmul)
    assert skewed.time_s["compute"] - even.time_s["compute"] == pytest.approx(0.5 * expert_time * layers * microbatches)
    # One rank holding every expert does all the routed work whatever the routing: no imbalance.
    flat = [estimate(workload, Layout(dp_shard=64, ep=1, activation_checkpointing="full"), H100,
                     Efficiency(expert_imbalance=x)).step_time_s for x in (1.0, 1.5)]
    assert flat[0] == flat[1]


def test_search_returns_valid_expert_parallel_layouts():
    workload = Workload(MIXTRAL, 4096, 1024)
    found = search(workload, 64, H100, top=5)
    assert found and any(e.layout.ep > 1 for e in found)
    for e in found:
        assert violations(workload, e.layout, H100, 64, Constraints(), e) == []
        assert MIXTRAL.n_experts % e.layout.ep == 0 and (e.layout.dp_shard * e.layout.cp) % e.layout.ep == 0
    # A fixed ep is kept; a dense model never gets ep > 1.
    assert {e.layout.ep for e in search(workload, 64, H100, constraints=Constraints(ep=4), top=3)} == {4}
    dense = Workload(get_preset("llama3-8b"), 8192, 64)
    assert {e.layout.ep for e in search(dense, 64, H100, top=3)} == {1}
    assert violations(dense, Layout(dp_shard=64, ep=2), H100, 64, Constraints())


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_auto_layout_gives_tiny_moe_a_valid_ep(world):
    args = get_preset("tiny-moe")
    chosen = auto_layout(args, world, 64, 16 * world if world != 3 else 48, "cpu")
    assert chosen.world_size == world
    assert args.n_experts % chosen.ep == 0 and (chosen.dp_shard * chosen.cp) % chosen.ep == 0
    if world == 4:  # 4 CPU processes, 8 experts: EP 4 is valid and the planner's choice must be one of 1, 2, 4
        assert chosen.ep in (1, 2, 4)


def test_soft_capped_attention_is_planned_without_context_parallelism():
    """Grok-1 soft-caps its attention logits, which context-parallel attention cannot (config.py refuses it)."""
    grok = get_preset("grok-1-314b")
    workload = Workload(grok, 8192, 2048)
    found = search(workload, 8192, H100, top=5)
    assert found and {e.layout.cp for e in found} == {1}
    assert violations(workload, Layout(dp_shard=128, tp=8, pp=4, cp=2, ep=8), H100, 8192, Constraints())


@pytest.mark.parametrize("name", ["mixtral-8x7b", "grok-1-314b", "qwen3-30b-a3b"])
def test_published_presets_cost_active_flops(name):
    args = get_preset(name)
    counts = param_counts(args)
    workload = Workload(args, 4096, 512)
    result = estimate(workload, Layout(dp_shard=512, tp=1, ep=8, activation_checkpointing="full"), H100)
    # MFU counts the active parameters: 6 x active matmul weights per token plus attention.
    assert result.mfu == pytest.approx(result.tokens_per_s * training_flops_per_token(args, 4096) / (512 * H100.peak_flops()))
    assert 0 < result.mfu < 1 and counts.active < counts.total / 3
    assert result.time_s["ep_comm"] > 0

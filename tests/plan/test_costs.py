"""Memory and FLOP formulas against hand-computed cases."""

import math

import pytest

from gigatrain.models.flops import param_counts, training_flops_per_token
from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import get_accelerator
from gigatrain.plan.costs import (GB, MEMORY_RESERVE_GB, Efficiency, Layout, Workload, activation_elements,
                                  bubble_microbatches, estimate, model_costs, ring_time, stage_split)

SMALL = ModelArgs(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, ffn_hidden=16, vocab_size=10, max_seq_len=4)


def test_flop_split_matches_hand_count():
    # Per layer: wq 8x8, wk and wv 8x4 each, wo 8x8 -> 192; MLP 3 x 8 x 16 -> 384.
    costs = model_costs(SMALL, 4)
    assert costs.layer_params == 192 + 384
    assert costs.layer_dense_flops == pytest.approx(6 * 576)  # 6 FLOPs per parameter per token
    assert costs.head_flops == pytest.approx(6 * 10 * 8)  # the untied LM head, 10 x 8
    assert costs.layer_attention_flops == pytest.approx(12 * 2 * 4 * 4)  # 12 x heads x head_dim x seq
    # The split adds back up to the trainer's one source of truth.
    total = SMALL.n_layers * (costs.layer_dense_flops + costs.layer_attention_flops) + costs.head_flops
    assert total == pytest.approx(training_flops_per_token(SMALL, 4))


def test_activation_elements_per_korthikanti():
    args = get_preset("llama3-8b")
    h, kv, f = 4096, 1024, 14336
    assert activation_elements(args, kv, 1, "none") == 6 * h + 2 * kv + 4 * f
    # Op-level selective keeps the input and the matmul and attention outputs (the trainer's policy).
    assert activation_elements(args, kv, 1, "selective") == 5 * h + 2 * kv + 2 * f
    # Megatron's (published runs) keeps the residual stream instead of the projections' outputs.
    assert activation_elements(args, kv, 1, "selective", op_level_selective=False) == 4 * h + 2 * kv + 2 * f
    assert activation_elements(args, kv / 4, 4, "selective") == pytest.approx(h / 4 + (2 * h + 2 * kv + 2 * f) / 4
                                                                            + 2 * (h + h / 4))
    # Full recompute keeps the layer input: 2sbh bytes per layer (Korthikanti et al. 2022), /t with SP.
    assert activation_elements(args, kv, 1, "full") == h
    assert activation_elements(args, kv / 4, 4, "full") == h / 4
    assert activation_elements(args, kv / 4, 4, "none") == pytest.approx((6 * h + 2 * kv + 4 * f) / 4)
    # Without flash attention the scores add 5as bytes per token (2.5as bf16 elements)...
    extra = activation_elements(args, kv, 1, "none", score_len=2048) - activation_elements(args, kv, 1, "none")
    assert extra == pytest.approx(2.5 * 32 * 2048)
    # ... and without sequence parallelism the 4h around the norms is whole on every TP rank.
    no_sp = activation_elements(args, kv / 8, 8, "none", sequence_parallel=False)
    assert no_sp == pytest.approx(4 * h + (2 * h + 2 * kv + 4 * f) / 8)


def test_memory_breakdown_fsdp_by_hand():
    """Llama 3 8B, FSDP over 8 H100s, one sequence of 8192 per micro-batch, no recompute."""
    args = get_preset("llama3-8b")
    workload = Workload(args, 8192, 8)
    result = estimate(workload, Layout(dp_shard=8, micro_batch_size=1), get_accelerator("h100"))
    params = param_counts(args).total
    layer_params = param_counts(args).per_layer
    memory = result.memory_gb
    assert memory["weights"] == pytest.approx(4 * params / 8 / GB)  # fp32 master, sharded 8 ways
    assert memory["gradients"] == pytest.approx(4 * params / 8 / GB)
    assert memory["optimizer"] == pytest.approx(8 * params / 8 / GB)  # AdamW exp_avg + exp_avg_sq
    assert memory["buffers"] == pytest.approx(MEMORY_RESERVE_GB + (layer_params + 2 * 4096) * (2 * 2 + 4) / GB)
    per_token_layer = 6 * 4096 + 2 * 1024 + 4 * 14336  # elements, bf16
    logits = 8192 * 128256 * (2 + 8)
    assert memory["activations"] == pytest.approx((32 * 8192 * per_token_layer * 2 + logits) / GB)
    assert result.fits == (sum(memory.values()) <= 0.95 * 80)  # ~75 GB: just fits
    # Two sequences per micro-batch do not, unless the layers are recomputed.
    assert not estimate(workload, Layout(dp_shard=8, micro_batch_size=2), get_accelerator("h100")).fits
    assert estimate(workload, Layout(dp_shard=8, micro_batch_size=2, activation_checkpointing="full"), get_accelerator("h100")).fits


def test_pipeline_memory_and_bubbles():
    assert bubble_microbatches(Layout(pp=1)) == 0
    assert bubble_microbatches(Layout(pp=8, pp_schedule="1F1B")) == 7
    assert bubble_microbatches(Layout(pp=8, pp_schedule="GPipe")) == 7
    assert bubble_microbatches(Layout(pp=8, pp_schedule="Interleaved1F1B", pp_stages_per_rank=4)) == pytest.approx(7 / 4)
    assert bubble_microbatches(Layout(pp=8, pp_schedule="LoopedBFS", pp_stages_per_rank=4)) == pytest.approx(7 / 4)
    assert bubble_microbatches(Layout(pp=8, pp_schedule="InterleavedZeroBubble", pp_stages_per_rank=2)) == pytest.approx(7 / 6)
    # 126 layers on 16 stages, the head worth 0.66 of a layer: 8 per stage, the rest on the last.
    assert stage_split(126, 16, 0.66, even=False) == (8, 6)
    assert stage_split(128, 16, 0.66, even=True) == (8, 8)


def test_ring_collective_time():
    # 8 ranks each holding 1 GB: every rank receives 7 GB over 7 ring steps.
    assert ring_time(1e9, 8, 100e9, 1e-6) == pytest.approx(7e9 / 100e9 + 7e-6)
    assert ring_time(1e9, 1, 100e9, 1e-6) == 0


def test_step_time_is_compute_bound_on_one_device():
    """One device, no communication: the step is the roofline of its layers plus the optimizer."""
    workload = Workload(SMALL, 4, 2, act_bytes=4)
    eff = Efficiency(matmul=0.5, attention=0.5, elementwise_passes=0, layer_overhead_s=0, step_overhead_s=0, memory=1e9)
    gpu = get_accelerator("cpu")
    result = estimate(workload, Layout(micro_batch_size=2), gpu, eff)
    costs = model_costs(SMALL, 4)
    tokens = 8
    flops = tokens * (2 * costs.layer_dense_flops + 2 * 0.5 * costs.layer_attention_flops + costs.head_flops)
    assert result.step_time_s == pytest.approx(flops / (gpu.peak_flops() * 0.5), rel=1e-6)
    assert result.mfu == pytest.approx(training_flops_per_token(SMALL, 4) * tokens / result.step_time_s / gpu.peak_flops())


def test_more_gpus_is_faster_and_mfu_is_a_fraction():
    workload = Workload(get_preset("llama3-70b"), 8192, 256)
    h100 = get_accelerator("h100")
    small = estimate(workload, Layout(dp_shard=32, tp=8, pp=4, micro_batch_size=1, activation_checkpointing="full"), h100)
    large = estimate(workload, Layout(dp_shard=64, tp=8, pp=4, micro_batch_size=1, activation_checkpointing="full"), h100)
    assert large.step_time_s < small.step_time_s
    for e in (small, large):
        assert 0 < e.mfu < 1 and e.hfu > e.mfu
        assert math.isclose(sum(e.time_s.values()), e.step_time_s, rel_tol=1e-9)

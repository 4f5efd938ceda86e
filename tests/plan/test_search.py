"""The search never returns a layout that breaks a constraint (property tests)."""

import math

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gigatrain.models.transformer import ModelArgs
from gigatrain.plan.catalog import get_accelerator
from gigatrain.plan.layout import Constraints, auto_layout, search, violations
from gigatrain.plan.costs import Workload

GPUS = ["a100", "h100", "gb200", "cpu"]


@st.composite
def problems(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([16, 32, 64]))
    args = ModelArgs(n_layers=draw(st.integers(1, 48)), d_model=heads * head_dim, n_heads=heads, n_kv_heads=kv_heads,
                     ffn_hidden=draw(st.sampled_from([64, 256, 1024])), vocab_size=draw(st.sampled_from([256, 32000])),
                     max_seq_len=4096, n_experts=draw(st.sampled_from([0, 0, 0, 4, 6, 8])), top_k=draw(st.sampled_from([1, 2])))
    seq = draw(st.sampled_from([64, 256, 1000, 2048, 4096]))
    batch = draw(st.sampled_from([1, 6, 16, 64, 96, 512]))
    gpus = draw(st.sampled_from([1, 2, 3, 6, 8, 12, 16, 24, 64, 100, 128, 1000]))
    constraints = Constraints(exact_gpus=draw(st.booleans()), even_stages=draw(st.booleans()),
                              tp=draw(st.sampled_from([None, None, 1, 2])), activation_checkpointing=draw(st.sampled_from([None, "full"])))
    return args, seq, batch, gpus, draw(st.sampled_from(GPUS)), constraints


# No shrinking phase: each example runs a whole search, and shrinking one can take minutes of
# a scarce CPU; the failing example is printed as drawn.
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=[Phase.explicit, Phase.reuse, Phase.generate])


@settings(max_examples=60, **FAST)
@given(problems())
def test_search_returns_only_valid_layouts(problem):
    args, seq, batch, gpus, gpu_name, constraints = problem
    gpu = get_accelerator(gpu_name)
    workload = Workload(args, seq, batch, act_bytes=4 if gpu_name == "cpu" else 2)
    found = search(workload, gpus, gpu, constraints=constraints, top=4)
    for estimate in found:
        layout = estimate.layout
        assert violations(workload, layout, gpu, gpus, constraints, estimate) == []
        if constraints.exact_gpus:
            assert layout.world_size == gpus
        assert estimate.gpus == layout.world_size <= gpus
    times = [e.step_time_s for e in found]
    # Ranked by step time; times within the model's precision (3 significant digits) tie.
    assert all(a <= b * 1.01 for a, b in zip(times, times[1:]))


@settings(max_examples=40, **FAST)
@given(problems())
def test_auto_layout_multiplies_to_the_world_size(problem):
    from gigatrain.config import ConfigError

    args, seq, batch, gpus, gpu_name, _ = problem
    try:
        chosen = auto_layout(args, gpus, seq, batch, gpu_name)
    except ConfigError as err:
        assert "\n" not in str(err) and gpus > 1  # world size 1 always has a layout
        return
    degrees = chosen.degrees()
    assert math.prod(degrees.values()) == gpus
    assert args.n_heads % degrees["tp"] == 0 and args.n_kv_heads % degrees["tp"] == 0
    assert args.n_layers % degrees["pp"] == 0
    assert degrees["cp"] == 1 or seq % (2 * degrees["cp"]) == 0
    assert batch % (degrees["dp_replicate"] * degrees["dp_shard"] * chosen.micro_batch_size) == 0
    # Expert parallelism is carved from dp_shard x cp and splits the experts evenly (1 for dense).
    assert (degrees["dp_shard"] * degrees["cp"]) % chosen.ep == 0
    assert chosen.ep == 1 if not args.is_moe else args.n_experts % chosen.ep == 0
    if gpus == 1:
        assert set(degrees.values()) == {1}


def test_auto_layout_picks_fsdp_for_a_small_model():
    from gigatrain.models.presets import get_preset

    chosen = auto_layout(get_preset("llama3-8b"), 8, 8192, 64, "h100")
    assert chosen.dp == 8 and chosen.tp == chosen.pp == 1


def test_fixed_choices_are_respected():
    from gigatrain.models.presets import get_preset

    workload = Workload(get_preset("llama3-70b"), 8192, 512)
    constraints = Constraints(tp=8, pp=4, pp_schedule="Interleaved1F1B", activation_checkpointing="full")
    found = search(workload, 1024, get_accelerator("h100"), constraints=constraints, top=3)
    assert found
    for e in found:
        assert (e.layout.tp, e.layout.pp, e.layout.pp_schedule, e.layout.activation_checkpointing) == \
            (8, 4, "Interleaved1F1B", "full")

"""Expert parallelism trains exactly like one process, and its checkpoints reshard.

The parallel tests' one `torchrun --nproc-per-node 4` job (gloo, CPU, fp32;
tests/parallel/conftest.py) trains tiny-moe (8 experts, top-2) under each expert-parallel layout in turn:
ep=4, ep=2 beside FSDP (each expert shard further sharded over 2 ranks), HSDP, a pipeline,
tensor parallelism and context parallelism, micro-batches and activation checkpointing; it also runs the dispatch/combine
property check (layout_checks.py). Each run is compared with one-process training on the same
global batches: every step's loss and gradient norm to 1e-5 relative, and the final weights
(the expert biases included: buffers are in the checkpoint) as the dense layouts are
(helpers.assert_weights_match). The runs use both balancing methods (tiny-moe's bias update
rate 1e-3, auxiliary loss coefficient 0.01), so the biases move (the test checks they did)
and the auxiliary loss reaches the gradients. Then the checkpoint saved at step 2 under ep=2 is resumed
under ep=4, under FSDP alone (ep=1) and in one process, and the next step's loss must equal
the uninterrupted one-process run's to 1e-6 relative.
"""

import json

import pytest

from gigatrain.rundir import RunDir
from helpers import (assert_resumes_in_one_process, assert_steps_match, assert_weights_match, final_weights, run_name,
                     step_values)

BASE = ["--model.preset=tiny-moe", "--model.tie_embeddings=false", "--model.aux_loss_coef=0.01", "--data.seq_len=32", "--train.batch_size=8",
        "--train.max_steps=3", "--train.eval_batches=1", "--train.eval_every=1000", "--train.samples=0",
        "--train.progress=plain", "--train.warmup_steps=1", "--train.lr=1e-3", "--train.device=cpu"]
LAYOUTS = {
    "EP 4": ["--parallel.ep=4"],
    "EP 2 x FSDP": ["--parallel.ep=2"],  # dp_shard 4: each expert shard over 2 ranks (efsdp 2)
    "EP 2 x HSDP": ["--parallel.dp_replicate=2", "--parallel.ep=2"],
    "EP 2 x PP 2": ["--parallel.pp=2", "--parallel.ep=2"],
    "EP 2 x TP 2": ["--parallel.tp=2", "--parallel.ep=2"],
    "EP 4 over FSDP x CP": ["--parallel.cp=2", "--parallel.ep=4"],
    "EP 2 x FSDP, micro-batches": ["--parallel.ep=2", "--train.micro_batch_size=1"],
    "EP 2 x FSDP, selective activation checkpointing": ["--parallel.ep=2", "--train.activation_checkpointing=selective"],
    "PP 2 x TP 2, no EP": ["--parallel.dp_shard=1", "--parallel.pp=2", "--parallel.tp=2"],
}
RESHARDS = {  # resumed at step 2 from the "EP 2 x FSDP" run's checkpoint
    "resumed under EP 4": ["--parallel.ep=4"],
    "resumed under FSDP alone": [],
}
SAVED = "ep2_at_2"


def layouts_plan() -> tuple[dict, list[dict]]:
    """This module's part of the parallel tests' one torchrun job (tests/parallel/conftest.py)."""
    plan = [{"name": "dispatch", "check": "ep_dispatch"},
            {"name": SAVED, "overrides": [*BASE, "--parallel.ep=2", "--train.stop_at_step=2"]}]
    plan += [{"name": run_name(label), "overrides": [*BASE, *overrides]} for label, overrides in LAYOUTS.items()]
    plan += [{"name": run_name(label), "overrides": [*BASE, *overrides], "resume_from": SAVED}
             for label, overrides in RESHARDS.items()]
    return {"one_process": BASE}, plan


@pytest.fixture(scope="module")
def runs(layouts_job):
    return layouts_job.folders[__name__]


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_moe_layout_matches_one_process(runs, label):
    reference, parallel = runs / "one_process", runs / run_name(label)
    assert_steps_match(reference, parallel)
    ref_weights, weights = final_weights(reference), final_weights(parallel)
    assert weights.keys() == ref_weights.keys()
    biases = [name for name in weights if name.endswith("router.expert_bias")]
    assert biases and all(weights[name].abs().max() > 0 for name in biases)  # the bias update ran
    for name, tensor in weights.items():
        assert_weights_match(tensor, ref_weights[name], name)
    layout = RunDir(parallel).read_run_info()["layout"]
    assert layout["ep"] == int(next((o.split("=")[1] for o in LAYOUTS[label] if o.startswith("--parallel.ep=")), 1))


@pytest.mark.parametrize("label", list(RESHARDS))
def test_moe_checkpoint_reshards(runs, label):
    resumed = step_values(runs / run_name(label))
    assert resumed[3] == pytest.approx(step_values(runs / "one_process")[3], rel=1e-6)
    assert resumed[1] == step_values(runs / SAVED)[1]  # the metrics file continued


def test_moe_checkpoint_from_ep_resumes_in_one_process(runs, byte_data, tmp_path):
    assert_resumes_in_one_process(runs / SAVED, runs / "one_process", byte_data, BASE, tmp_path, rel=1e-6)


def test_ep_dispatch_combine_equals_per_token_reference(runs):
    """Outputs, input gradients and expert-weight gradients of the round trip, for random
    routings (ranks and experts without tokens included), against one token at a time through
    the whole experts: differences of rounding only (values are of order 10)."""
    cases = [case for rank in range(4) for case in json.loads((runs / "dispatch" / f"ep_dispatch_rank{rank}.json").read_text())]
    assert len(cases) == 4 * 2 * 5 and any(case["tokens"] == 0 for case in cases)
    for case in cases:
        for key in ("out", "x_grad", "w1_grad", "w2_grad", "w3_grad"):
            assert case[key] <= 2e-5, f"ep={case['ep']} trial {case['trial']}: {key} differs by {case[key]:.2e}"

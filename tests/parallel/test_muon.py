"""Muon under every kind of sharding trains exactly like one process.

The parallel tests' one `torchrun --nproc-per-node 4` job (gloo, CPU, fp32;
tests/parallel/conftest.py) trains the tiny config with `train.optimizer=muon` under FSDP, HSDP, TP + sequence parallel,
FSDP x TP and a 1F1B pipeline: the matrices' Newton–Schulz needs each matrix whole, so a
per-shard update would differ from one process by far more than rounding. FSDP, HSDP and TP
deal matrices out to owner ranks (all-to-all), FSDP x TP gathers them everywhere, FSDP over
tiny-moe's expert stacks orthogonalises whole experts in place: each path is compared. Compared with
one-process Muon: every step's loss and gradient norm to 1e-5 relative, the final weights
to 1e-5 relative plus 1e-6 absolute (Muon's orthogonalised update has no near-zero-gradient
sign flips, unlike Adam's, so every element is held to it). Then a checkpoint saved under
FSDP at step 2 resumes under FSDP bit for bit (the momentum buffers are saved sharded) and in
one process (resharded), with the same step-3 loss.
"""

import json

import pytest
import torch

from helpers import assert_resumes_in_one_process, assert_steps_match, final_weights, run_name, step_values

BASE = ["--model.preset=tiny", "--model.tie_embeddings=false", "--model.n_layers=4", "--model.n_heads=8",
        "--model.n_kv_heads=4", "--data.seq_len=32", "--train.batch_size=8", "--train.max_steps=3",
        "--train.eval_batches=1", "--train.eval_every=1000", "--train.samples=0", "--train.progress=plain",
        "--train.warmup_steps=1", "--train.lr=1e-3", "--train.device=cpu",
        "--train.optimizer=muon", "--train.embed_lr=3e-3"]
SOLO = ["--parallel.dp_shard=1"]
LAYOUTS = {
    "FSDP": [],
    "HSDP": ["--parallel.dp_replicate=2"],
    "TP + sequence parallel": [*SOLO, "--parallel.tp=4"],
    "FSDP x TP": ["--parallel.tp=2"],
    "PP 1F1B": [*SOLO, "--parallel.pp=4", "--parallel.pp_schedule=1F1B"],
    # FSDP splits the [experts, out, in] stacks along the experts: each rank orthogonalises
    # its own whole experts' matrices, with no gather.
    "FSDP, tiny-moe": ["--model.preset=tiny-moe"],
}
MOE = "--model.preset=tiny-moe"


def reference_name(label: str) -> str:
    return "one_process_moe" if MOE in LAYOUTS[label] else "one_process"


def layouts_plan() -> tuple[dict, list[dict]]:
    """This module's part of the parallel tests' one torchrun job (tests/parallel/conftest.py)."""
    plan = [{"name": "shards", "check": "muon_shards"},
            {"name": "fsdp_at_2", "overrides": [*BASE, "--train.stop_at_step=2"]}]
    plan += [{"name": run_name(label), "overrides": [*BASE, *overrides]} for label, overrides in LAYOUTS.items()]
    plan.append({"name": "fsdp_resumed", "overrides": BASE, "resume_from": "fsdp_at_2"})
    return {"one_process": BASE, "one_process_moe": [*BASE, MOE]}, plan


@pytest.fixture(scope="module")
def runs(layouts_job):
    return layouts_job.folders[__name__]


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_muon_layout_matches_one_process(runs, label):
    reference, parallel = runs / reference_name(label), runs / run_name(label)
    assert_steps_match(reference, parallel)
    ref_weights = final_weights(reference)
    for name, tensor in final_weights(parallel).items():
        torch.testing.assert_close(tensor, ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_muon_resumes_bit_exactly_under_fsdp(runs):
    resumed, straight = runs / "fsdp_resumed", runs / run_name("FSDP")
    assert step_values(resumed) == step_values(straight)
    a, b = final_weights(resumed), final_weights(straight)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_muon_state_from_four_processes_resumes_in_one(runs, byte_data, tmp_path):
    assert_resumes_in_one_process(runs / "fsdp_at_2", runs / "one_process", byte_data, BASE, tmp_path, rel=1e-5)


def test_owner_ranks_orthogonalise_uneven_shards_exactly(runs):
    """6 matrices over 4 ranks (the last batch padded), rows and columns split unevenly: each
    rank's shards of the owner ranks' orthogonalisation equal the whole matrices', bit for bit."""
    for rank in range(4):
        cases = json.loads((runs / "shards" / f"muon_shards_rank{rank}.json").read_text())
        assert len(cases) == 2 * 6
        for case in cases:
            assert case["equal"], f"rank {rank}, dim {case['dim']}, {case['shape']}: off by {case['difference']:.2e}"

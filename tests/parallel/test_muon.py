"""Muon under every kind of sharding trains exactly like one process.

One `torchrun --nproc-per-node 4` job (gloo, CPU, fp32; tests/parallel/layouts_worker.py)
trains the tiny config with `train.optimizer=muon` under FSDP, HSDP, TP + sequence parallel,
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
import shutil
import sys

import pytest
import torch

from gigatrain.config import load_config
from gigatrain.train.trainer import train
from helpers import REPO, final_weights, run_group, step_values

BASE = ["--model.preset=tiny", "--model.tie_embeddings=false", "--model.n_layers=4", "--model.n_heads=8",
        "--model.n_kv_heads=4", "--data.seq_len=32", "--train.batch_size=8", "--train.max_steps=3",
        "--train.eval_batches=1", "--train.eval_every=1000", "--train.samples=0", "--train.progress=plain",
        "--train.warmup_steps=1", "--train.lr=1e-3", "--train.device=cpu", "--train.checkpoint_every=2",
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


def run_name(label: str) -> str:
    return "muon_" + "".join(c if c.isalnum() else "_" for c in label)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, byte_data):
    out = tmp_path_factory.mktemp("muon")
    for name, overrides in (("one_process", []), ("one_process_moe", [MOE])):
        train(load_config(None, [f"--data.path={byte_data}", f"--run.dir={out / name}", *BASE, *overrides]))
    plan = [{"name": "fsdp_at_2", "overrides": ["--train.stop_at_step=2"]}]
    plan += [{"name": run_name(label), "overrides": overrides} for label, overrides in LAYOUTS.items()]
    plan.append({"name": "fsdp_resumed", "overrides": [], "resume_from": "fsdp_at_2"})
    result = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone",
         str(REPO / "tests/parallel/layouts_worker.py"), str(byte_data), str(out), json.dumps(BASE), json.dumps(plan)],
        timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_muon_layout_matches_one_process(runs, label):
    reference, parallel = runs / reference_name(label), runs / run_name(label)
    for key in ("loss", "grad_norm"):
        expected, got = step_values(reference, key), step_values(parallel, key)
        assert sorted(got) == [1, 2, 3]
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-5), f"{key} at step {step}"
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
    run_dir = tmp_path / "one_process_resume"
    shutil.copytree(runs / "fsdp_at_2", run_dir)
    train(load_config(None, [f"--data.path={byte_data}", f"--run.dir={run_dir}", *BASE]))
    assert step_values(run_dir)[3] == pytest.approx(step_values(runs / "one_process")[3], rel=1e-5)


def test_owner_ranks_orthogonalise_uneven_shards_exactly():
    result = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone",
                        str(REPO / "tests/parallel/muon_shards_worker.py")], timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

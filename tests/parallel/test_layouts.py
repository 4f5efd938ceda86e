"""Every parallel layout trains exactly like one process.

One `torchrun --nproc-per-node 4` job (gloo, CPU, fp32), shared with the MoE, Muon and
QK-norm tests (tests/parallel/conftest.py), trains the same tiny config under each layout in
turn, sharing one process group; this module compares each run with
one-process training on the same global batches: the loss of every step to 1e-5
relative, and the final weights (loaded from each layout's DCP checkpoint into a plain
one-process model, which is itself a resharding test) to 1e-5 relative plus 1e-6
absolute, except that one element in a thousand may differ by up to 5% of one Adam step
(lr 1e-3): where a gradient is near zero, Adam's update is about lr * sign(g), so a
rounding-level difference in the order of a sum moves that weight by a fraction of lr.
Adam is blind to the scale of the gradient, so the gradient norm of every step is
compared too (1e-5 relative): a missing or doubled average would show there.
Measured on 2026-11-24: losses and gradient norms agree to 2e-7, at least 99.95% of
every tensor's elements are close, and the worst element is 1.1e-5 off (TP).
Then checkpoints saved under FSDP are resumed under TP x FSDP, PP x FSDP and in one
process, and the next step's loss must equal the uninterrupted run's.
Tied embeddings (one [vocab, d_model] weight for the embeddings and the head) are compared
with tied one-process training in the same way, under TP, PP and both, and resumed under
PP x TP from a tied FSDP checkpoint. So are the architecture options all at once (squared-ReLU
MLP, output-logit soft-capping, QK-norm, zero-initialised residual projections) under
FSDP x TP, and resumed under PP x TP from an FSDP checkpoint of them (two layouts only: the
suite's time; QK-norm under TP alone has its own test, tests/parallel/test_qk_norm_tp.py).
"""

import json
import os

import pytest
import torch

from gigatrain.rundir import RunDir
from helpers import (REPO, assert_resumes_in_one_process, assert_steps_match, assert_weights_match, final_weights,
                     run_name, step_values)

# No checkpoint_every: a run stopped at step 2 (train.stop_at_step) saves its final checkpoint
# there, the one the reshard runs resume from; a mid-run save of the 3-step runs was never read.
# Small enough for 4 processes on 2 cores, shaped so every layout applies: 8 heads and 4 KV
# heads split over tp=4, 8 layers into 4 stages x 2 per rank, 32 positions into 2*cp=8 chunks.
BASE = ["--model.preset=tiny", "--model.tie_embeddings=false", "--model.n_layers=8", "--model.n_heads=8",
        "--model.n_kv_heads=4", "--data.seq_len=32", "--train.batch_size=8", "--train.max_steps=3",
        "--train.eval_batches=1", "--train.eval_every=1000", "--train.samples=0", "--train.progress=plain",
        "--train.warmup_steps=1", "--train.lr=1e-3", "--train.device=cpu"]
SOLO = ["--parallel.dp_shard=1"]  # an axis alone: no sharding beside it

LAYOUTS = {
    "replicate (DDP-like)": ["--parallel.dp_replicate=4", "--parallel.dp_shard=1"],
    "FSDP": [],  # dp_shard=-1: all four processes
    "HSDP": ["--parallel.dp_replicate=2"],
    "TP + sequence parallel": [*SOLO, "--parallel.tp=4"],
    "CP": [*SOLO, "--parallel.cp=4"],
    "PP GPipe": [*SOLO, "--parallel.pp=4", "--parallel.pp_schedule=GPipe"],
    "PP 1F1B": [*SOLO, "--parallel.pp=4", "--parallel.pp_schedule=1F1B"],
    "PP Interleaved1F1B": [*SOLO, "--parallel.pp=4", "--parallel.pp_schedule=Interleaved1F1B"],
    "PP LoopedBFS": [*SOLO, "--parallel.pp=4", "--parallel.pp_schedule=LoopedBFS"],
    "PP InterleavedZeroBubble": [*SOLO, "--parallel.pp=4", "--parallel.pp_schedule=InterleavedZeroBubble"],
    "FSDP x TP": ["--parallel.tp=2"],
    "PP x FSDP": ["--parallel.pp=2"],
    "CP x TP": [*SOLO, "--parallel.cp=2", "--parallel.tp=2"],
    "PP x TP": [*SOLO, "--parallel.pp=2", "--parallel.tp=2"],
    "HSDP with micro-batches": ["--parallel.dp_replicate=2", "--train.micro_batch_size=1"],
}
TIED = ["--model.tie_embeddings=true"]
TIED_LAYOUTS = {  # compared with tied one-process training
    "TP + sequence parallel, tied embeddings": [*TIED, *SOLO, "--parallel.tp=4"],
    "PP Interleaved1F1B, tied embeddings": [*TIED, *SOLO, "--parallel.pp=4", "--parallel.pp_schedule=Interleaved1F1B"],
    "PP x FSDP, tied embeddings": [*TIED, "--parallel.pp=2"],
    "PP x TP, tied embeddings": [*TIED, *SOLO, "--parallel.pp=2", "--parallel.tp=2"],
}
# The architecture options together (a cap of 5 bites: the tiny model's logits reach it).
ARCH = ["--model.mlp_activation=relu2", "--model.logit_softcap=5", "--model.qk_norm=true",
        "--model.zero_init_residual=true"]
ARCH_LAYOUTS = {  # compared with one-process training with the same options
    "FSDP x TP, architecture options": [*ARCH, "--parallel.tp=2"],
}
RESHARDS = {  # resumed at step 2 from the FSDP run's checkpoint (tied: the tied FSDP run's; ...)
    "resumed under FSDP x TP": ["--parallel.tp=2"],
    "resumed under PP x FSDP": ["--parallel.pp=2", "--parallel.pp_schedule=GPipe"],
    "resumed tied under PP x TP": [*TIED, *SOLO, "--parallel.pp=2", "--parallel.tp=2"],
    "resumed with architecture options under PP x TP": [*ARCH, *SOLO, "--parallel.pp=2", "--parallel.tp=2"],
}
# A one-process reference run and an FSDP run stopped at step 2 for each family of runs.
FAMILIES = {"": [], "tied": TIED, "arch": ARCH}


def family(label: str) -> str:
    overrides = {**LAYOUTS, **TIED_LAYOUTS, **ARCH_LAYOUTS, **RESHARDS}[label]
    return next((name for name, marks in FAMILIES.items() if marks and marks[0] in overrides), "")


def reference_name(label: str) -> str:
    """The one-process run a layout's run is compared with."""
    return "_".join(filter(None, ["one_process", family(label)]))


def saved_at_2(label: str) -> str:
    """The run whose step-2 checkpoint a reshard run resumes from."""
    return "_".join(filter(None, ["fsdp", family(label), "at_2"]))


def layouts_plan() -> tuple[dict, list[dict]]:
    """This module's part of the parallel tests' one torchrun job (tests/parallel/conftest.py)."""
    references = {"_".join(filter(None, ["one_process", name])): [*BASE, *overrides] for name, overrides in FAMILIES.items()}
    plan = [{"name": "_".join(filter(None, ["fsdp", name, "at_2"])), "overrides": [*BASE, *overrides, "--train.stop_at_step=2"]}
            for name, overrides in FAMILIES.items()]
    plan += [{"name": run_name(label), "overrides": [*BASE, *overrides]}
             for label, overrides in {**LAYOUTS, **TIED_LAYOUTS, **ARCH_LAYOUTS}.items()]
    plan += [{"name": run_name(label), "overrides": [*BASE, *overrides], "resume_from": saved_at_2(label)}
             for label, overrides in RESHARDS.items()]
    plan.append({"name": "tp_logits", "overrides": [*BASE, *LAYOUTS["TP + sequence parallel"]], "probe_logits": True})
    return references, plan


@pytest.fixture(scope="module")
def runs(layouts_job):
    return layouts_job.folders[__name__], layouts_job.stdout


@pytest.mark.parametrize("label", [*LAYOUTS, *TIED_LAYOUTS, *ARCH_LAYOUTS])
def test_layout_matches_one_process(runs, byte_data, label):
    out, _ = runs
    reference, parallel = out / reference_name(label), out / run_name(label)
    assert_steps_match(reference, parallel)
    ref_weights = final_weights(reference)
    for name, tensor in final_weights(parallel).items():
        assert_weights_match(tensor, ref_weights[name], name)
    # One file, written once, by rank 0: the same keys as a one-process run.
    records = RunDir(parallel).metrics_records()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert {k for r in records for k in r} == {k for r in RunDir(reference).metrics_records() for k in r}
    run_info = RunDir(parallel).read_run_info()
    assert run_info["world_size"] == 4


@pytest.mark.parametrize("label", list(RESHARDS))
def test_checkpoint_reshards_to_another_layout(runs, label):
    out, _ = runs
    saved = out / saved_at_2(label)
    assert max(step_values(saved)) == 2
    resumed = step_values(out / run_name(label))
    assert resumed[3] == pytest.approx(step_values(out / reference_name(label))[3], rel=1e-5)
    assert resumed[1] == step_values(saved)[1]  # the metrics file continued, not restarted


def test_checkpoint_from_four_processes_resumes_in_one(runs, byte_data, tmp_path):
    out, _ = runs
    assert_resumes_in_one_process(out / "fsdp_at_2", out / "one_process", byte_data, BASE, tmp_path, rel=1e-5)


def test_only_rank_zero_prints(layouts_job):
    """One line per run that reached max_steps, of every module's runs in the job."""
    finished = [entry for entry in layouts_job.plan if "overrides" in entry and not entry.get("probe_logits")
                and not any(o.startswith("--train.stop_at_step=") for o in entry["overrides"])]
    assert layouts_job.stdout.count("stopped by max_steps") == len(finished)


def test_tensor_parallel_never_holds_full_vocabulary_logits(runs):
    """Loss parallel: each of the 4 TP ranks holds a quarter of the vocabulary's logits, and
    the loss of them is the whole logits' loss even where plain logits that large would go
    through the chunks (parallel.tensor.parallel_loss)."""
    out, _ = runs
    for rank in range(4):
        record = json.loads((out / "tp_logits" / f"logits_rank{rank}.json").read_text())
        assert record["type"] == "DTensor" and record["sharded_dims"] == [2]  # split over the vocabulary
        # The whole batch (tp ranks share it) and sequence, a quarter of the 256 byte-level ids.
        assert record["local_shape"] == [8, 32, 256 // 4]
        assert record["loss_difference"] < 1e-5


# -- golden losses ---------------------------------------------------------------------
# A refactor that does not change the math must give the same losses bit for bit. The golden
# file holds, for a few fixed runs of this module (one process and three layouts), every
# step's loss and gradient norm and the final validation loss, written exactly (float.hex).
# Bits depend on the kernels, so each entry is keyed by the torch version and the CPU's
# vector extension: where the key matches, equality is exact; on another machine the run is
# still compared, to 1e-5 relative as the layouts are (and the file can gain its key).
# Regenerate after a change that is meant to change the math, and say so in the commit:
#     GIGATRAIN_WRITE_GOLDEN=1 python -m pytest -q tests/parallel/test_layouts.py -k golden
GOLDEN_FILE = REPO / "tests/golden_losses.json"
GOLDEN_RUNS = {"one process": "one_process", "one process, tied": "one_process_tied", "FSDP": run_name("FSDP"),
               "PP x TP": run_name("PP x TP"), "HSDP with micro-batches": run_name("HSDP with micro-batches")}


def golden_key() -> str:
    return f"torch {torch.__version__.split('+')[0]} {torch.backends.cpu.get_cpu_capability()}"


def golden_record(run_dir) -> dict:
    records = RunDir(run_dir).metrics_records()
    values = {key: [float(r[key]).hex() for r in records if key in r] for key in ("loss", "grad_norm", "val_loss")}
    assert values["loss"] and values["val_loss"], f"{run_dir} has no losses to compare"
    return values


def test_losses_match_the_golden_file(runs):
    out, _ = runs
    got = {label: golden_record(out / name) for label, name in GOLDEN_RUNS.items()}
    golden = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}
    if os.environ.get("GIGATRAIN_WRITE_GOLDEN") == "1":
        golden[golden_key()] = got
        GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert golden, f"{GOLDEN_FILE} is missing; write it with GIGATRAIN_WRITE_GOLDEN=1 (see this module)"
    if golden_key() in golden:
        assert got == golden[golden_key()], "losses differ from the golden file bit for bit"
        return
    # Another torch or CPU: the same runs, to rounding. Any recorded environment will do.
    expected = next(iter(golden.values()))
    for label, values in expected.items():
        for key, hexes in values.items():
            assert [float.fromhex(h) for h in got[label][key]] == pytest.approx(
                [float.fromhex(h) for h in hexes], rel=1e-5), f"{label}: {key}"

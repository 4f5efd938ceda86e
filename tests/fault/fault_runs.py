"""The two-process gloo runs under torchrun that the fault tests inject failures into, and
what they compare: a run against the uninterrupted reference (conftest.py), bit for bit."""

import torch

from gigatrain.rundir import RunDir
from helpers import TINY, final_weights, run_group, step_values, torchrun

STEPS = 10
BASE = [*TINY, "--train.device=cpu", "--train.eval_every=1000", f"--train.max_steps={STEPS}",
        "--train.checkpoint_every=5"]


def train_2proc(byte_data, run_dir, *overrides, fault="", restarts=0, timeout=240):
    command = torchrun("--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}", "-m", "gigatrain",
                       "train", *BASE, f"--data.path={byte_data}", f"--run.dir={run_dir}", *overrides)
    return run_group(command, timeout=timeout, env={"GIGATRAIN_FAULT": fault})


def events(run_dir, kind=None):
    found = RunDir(run_dir).event_records()
    return [e for e in found if kind is None or e["event"] == kind]


def assert_same_run(run_dir, reference):
    """Bit for bit: every step's loss and gradient norm, and the final weights."""
    assert step_values(run_dir) == step_values(reference)
    assert step_values(run_dir, "grad_norm") == step_values(reference, "grad_norm")
    got, want = final_weights(run_dir), final_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name

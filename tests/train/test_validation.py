"""The validator alone: when it evaluates, and how the end of a run is planned under a time limit."""

import pytest
import torch

from gigatrain.config import load_config, resolve_model_args
from gigatrain.parallel.mesh import parallel_dims
from gigatrain.train.stopping import RunClock
from gigatrain.train.validation import IGNORE, EndCosts, Validator, end_plan, pad_batch


def validator(*overrides, world_size=1):
    cfg = load_config(None, list(overrides))
    dims = parallel_dims(cfg, resolve_model_args(cfg), world_size)
    return Validator(cfg, data=None, parallel=None, dims=dims, device=torch.device("cpu"), dtype=None, clock=RunClock(0.0, cfg.train.time_limit_s), run_dir=None)


def test_evaluates_every_eval_every_steps_but_the_last_which_ends_the_run():
    v = validator("--train.eval_every=5", "--train.max_steps=12", "--train.eval_batches=4")
    assert [step for step in range(1, 13) if v.due(step)] == [5, 10]
    v.costs.eval_batch_s = 0.5
    assert v.cost_at_s(10) == 2.0 and v.cost_at_s(11) == 0.0
    assert [step for step in range(1, 11) if validator("--train.eval_every=5", "--train.max_steps=10").due(step)] == [5]


def test_without_a_time_limit_the_end_does_everything():
    assert end_plan(EndCosts(eval_batch_s=100.0, sample_s=100.0), 8, 3, time_limit_s=0) == (8, 3)


@pytest.mark.parametrize("costs, plan", [
    (EndCosts(eval_batch_s=2.0, sample_s=1.0), (5, 0)),  # 10% of 100 s: five batches fill it
    (EndCosts(eval_batch_s=0.5, sample_s=2.0), (8, 3)),  # all 8 batches (4 s), 6 s left: 3 samples
    (EndCosts(eval_batch_s=0.5, sample_s=0.0), (8, 4)),  # samples not measured: all of them
    (EndCosts(eval_batch_s=50.0, sample_s=1.0), (1, 0)),  # at least one batch, even over the share
])
def test_under_a_time_limit_the_end_gets_a_tenth_of_it_evaluation_first(costs, plan):
    assert end_plan(costs, eval_batches=8, samples=4, time_limit_s=100) == plan


def test_a_multi_process_run_plans_no_samples_and_reserves_what_it_plans():
    single = validator("--train.time_limit_s=100", "--train.eval_batches=8", "--train.samples=4")
    single.costs = EndCosts(eval_batch_s=0.5, sample_s=2.0)
    assert single.end_plan() == (8, 3) and single.end_cost_s() == 8 * 0.5 + 3 * 2.0
    several = validator("--train.time_limit_s=100", "--train.eval_batches=8", "--train.samples=4", world_size=2)
    several.costs = EndCosts(eval_batch_s=0.5, sample_s=2.0)
    assert several.end_plan() == (8, 0)


def test_a_short_batch_is_padded_with_targets_that_count_for_nothing():
    inputs, targets = torch.arange(6).view(2, 3), torch.arange(6).view(2, 3) + 1
    padded_inputs, padded_targets = pad_batch(inputs, targets, rows=4)
    assert padded_inputs.shape == (4, 3) and torch.equal(padded_inputs[2:], inputs[:1].expand(2, -1))
    assert torch.equal(padded_targets[:2], targets) and (padded_targets[2:] == IGNORE).all()
    full_inputs, full_targets = pad_batch(inputs, targets, rows=2)
    assert full_inputs is inputs and full_targets is targets

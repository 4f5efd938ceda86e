"""The numerical guard's decisions, and a skipped update leaving weights and optimizer state
exactly as they were."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from gigatrain.config import FaultConfig, load_config
from gigatrain.fault.guard import NumericalGuard
from gigatrain.fault.inject import FaultPlan, parse
from gigatrain.train.trainer import Trainer
from helpers import TINY


def test_nan_inf_and_spikes_are_skipped():
    guard = NumericalGuard(FaultConfig(loss_spike_factor=2.0, spike_window=3, rollback_after=2))
    assert guard.check(float("nan"), 1.0) == "nan"  # before the window fills, NaNs still count
    assert guard.check(1.0, float("inf")) == "nan"
    assert guard.wants_rollback
    for loss in (4.0, 5.0, 6.0):
        assert guard.check(loss, 1.0) is None
    assert not guard.wants_rollback and guard.mean() == 5.0
    assert guard.check(10.01, 1.0) == "spike"  # > 2 x 5.0
    assert guard.mean() == 5.0  # a skipped loss does not enter the mean
    assert guard.check(9.99, 1.0) is None
    assert guard.mean() == (5.0 + 6.0 + 9.99) / 3


def test_spike_check_waits_for_a_full_window_and_can_be_disabled():
    guard = NumericalGuard(FaultConfig(loss_spike_factor=2.0, spike_window=4))
    assert [guard.check(x, 1.0) for x in (1.0, 100.0, 1.0, 1.0)] == [None] * 4
    off = NumericalGuard(FaultConfig(loss_spike_factor=0, spike_window=1))
    assert off.check(1.0, 1.0) is None and off.check(1e9, 1.0) is None


@given(st.lists(st.floats(min_value=0.1, max_value=10.0), min_size=1, max_size=40), st.integers(1, 6))
def test_rollbacks_come_after_exactly_rollback_after_skips_in_a_row(losses, rollback_after):
    guard = NumericalGuard(FaultConfig(loss_spike_factor=0, rollback_after=rollback_after))
    in_a_row = 0
    for i, loss in enumerate(losses):
        bad = i % 3 == 0
        assert guard.check(math.nan if bad else loss, 1.0) == ("nan" if bad else None)
        in_a_row = in_a_row + 1 if bad else 0
        assert guard.wants_rollback == (in_a_row >= rollback_after)


def test_a_skipped_update_changes_no_weight_and_no_optimizer_state(tmp_path, byte_data):
    cfg = load_config(None, [*TINY, f"--data.path={byte_data}", f"--run.dir={tmp_path}", "--train.device=cpu"])
    trainer = Trainer(cfg)
    inputs, targets = trainer.loader.next_batch()
    trainer.train_step(inputs, targets, lr=1e-3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizers[0].state.items()}
    trainer.faults = FaultPlan(parse("nan:step=2"), tmp_path, rank=0)
    trainer.state.step = 1
    loss, grad_norm, skipped = trainer.train_step(inputs, targets, lr=1e-3)
    assert skipped == "nan" and math.isnan(loss) and math.isnan(grad_norm)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for param, state in trainer.optimizers[0].state.items():
        for key, value in state.items():
            assert torch.equal(value, moments[id(param)][key]), key
    assert all(p.grad is None for p in trainer.model.parameters())

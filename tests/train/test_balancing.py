"""MoE balancing and router statistics in one process: the bias update, the auxiliary loss's
gradients, and their invariance to micro-batching, activation checkpointing and compile."""

import pytest
import torch

from helpers import TINY
from gigatrain.rundir import resolve_run_config
from gigatrain.train.trainer import Trainer

MOE = ["--model.preset=tiny-moe", "--train.device=cpu"]


def moe_trainer(run_dir, data, *extra) -> Trainer:
    return Trainer(resolve_run_config(None, [*TINY, *MOE, f"--run.dir={run_dir}", f"--data.path={data}", *extra]))


def test_bias_moves_each_expert_towards_the_mean_count_and_counts_reset(tmp_path, byte_data):
    trainer = moe_trainer(tmp_path / "run", byte_data, "--model.bias_update_rate=0.01")
    layers = trainer.parallel.moe_layers
    counts = torch.tensor([[5.0, 1, 1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2, 3, 1]])
    for (_, moe), layer_counts in zip(layers, counts):
        moe.tokens_per_expert.copy_(layer_counts)
    record = trainer.balance.after_step(applied=True)
    for (_, moe), layer_counts in zip(layers, counts):
        expected = 0.01 * torch.sign(layer_counts.mean() - layer_counts)
        assert torch.equal(moe.router.expert_bias, expected)
        assert moe.tokens_per_expert.sum() == 0  # reset for the next step
    assert record["expert_load"] == [5.0, 1.5]
    assert record["expert_load_max"] == 3.25
    assert "aux_loss" not in record  # no auxiliary loss in this run
    # A skipped update leaves the bias as it was.
    for (_, moe), layer_counts in zip(layers, counts):
        moe.tokens_per_expert.copy_(layer_counts)
    before = [moe.router.expert_bias.clone() for _, moe in layers]
    trainer.balance.after_step(applied=False)
    assert all(torch.equal(b, moe.router.expert_bias) for b, (_, moe) in zip(before, layers))


def test_counts_are_the_whole_batchs_and_micro_batches_change_nothing(tmp_path, byte_data):
    whole = moe_trainer(tmp_path / "a", byte_data)
    micro = moe_trainer(tmp_path / "b", byte_data, "--train.micro_batch_size=2")
    inputs, targets = whole.loader.next_batch()
    whole.train_step(inputs, targets, lr=1e-3)
    micro.train_step(inputs, targets, lr=1e-3)
    # Every (token, choice) pair of the batch is counted once in each layer.
    assert whole.moe_record["expert_load"] == micro.moe_record["expert_load"]
    for (_, a), (_, b) in zip(whole.parallel.moe_layers, micro.parallel.moe_layers):
        assert torch.equal(a.router.expert_bias, b.router.expert_bias)
        assert a.router.expert_bias.abs().sum() > 0  # tiny-moe's rate moved it

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


def explicit_balance_loss(chosen: torch.Tensor, scores: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e of each sequence, written out plainly: chosen [batch, seq, k], scores [batch, seq, E]."""
    losses = []
    for seq_chosen, seq_scores in zip(chosen, scores):
        fraction = torch.stack([(seq_chosen == e).sum() for e in range(n_experts)]).float() / seq_chosen.numel()
        losses.append(n_experts * (fraction * seq_scores.mean(dim=0)).sum())
    return torch.stack(losses)


def test_aux_loss_gradients_are_those_of_lm_loss_plus_aux_and_loss_stays_the_lm_loss(tmp_path, byte_data):
    coef = 0.5  # large, so that a wrong scale shows
    with_aux = moe_trainer(tmp_path / "a", byte_data, f"--model.aux_loss_coef={coef}")
    explicit = moe_trainer(tmp_path / "b", byte_data, f"--model.aux_loss_coef={coef}")
    inputs, targets = with_aux.loader.next_batch()
    loss = with_aux.parallel.forward_backward(inputs, targets)

    # The same model computing LM loss + coef * sum over layers of the mean sequence loss by hand.
    captured = []
    for _, moe in explicit.parallel.moe_layers:
        moe.aux_loss_coef = 0.0
        moe.router.register_forward_hook(lambda module, args, out: captured.append(out))
    from gigatrain.models.loss import loss_fn
    lm_loss = loss_fn(explicit.model(inputs), targets)
    aux = sum(explicit_balance_loss(chosen.view(8, 64, -1), scores.view(8, 64, -1), 8).mean()
              for _, chosen, scores in captured)
    (lm_loss + coef * aux).backward()

    assert loss.item() == pytest.approx(lm_loss.item(), rel=1e-6)
    for (name, p), q in zip(with_aux.model.named_parameters(), explicit.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    gate = with_aux.parallel.moe_layers[0][1].router.gate.weight
    stats = with_aux.parallel.expert_statistics()
    assert stats[:, 8].sum() / stats[:, 9].sum() == pytest.approx(aux.item() / 2, rel=1e-5)  # mean over layers
    assert gate.grad.abs().sum() > 0


def test_aux_loss_under_micro_batches_equals_the_whole_batch(tmp_path, byte_data):
    whole = moe_trainer(tmp_path / "a", byte_data, "--model.aux_loss_coef=0.5")
    micro = moe_trainer(tmp_path / "b", byte_data, "--model.aux_loss_coef=0.5", "--train.micro_batch_size=4")
    assert_counts_once(whole, micro)
    inputs, targets = whole.loader.next_batch()
    loss_whole, norm_whole, _ = whole.train_step(inputs, targets, lr=1e-3)
    loss_micro, norm_micro, _ = micro.train_step(inputs, targets, lr=1e-3)
    assert loss_micro == pytest.approx(loss_whole, rel=1e-5)
    assert norm_micro == pytest.approx(norm_whole, rel=1e-5)
    assert micro.moe_record["aux_loss"] == pytest.approx(whole.moe_record["aux_loss"], rel=1e-6)
    for p, q in zip(whole.model.parameters(), micro.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)  # Adam magnifies tiny differences of tiny gradients


def assert_counts_once(reference: Trainer, other: Trainer) -> None:
    """One forward and backward: `other` counts every (token, choice) pair of the batch once,
    as `reference` does, and has the same balance losses; then both are reset."""
    inputs, targets = reference.loader.next_batch()
    for trainer in (reference, other):
        trainer.parallel.forward_backward(inputs, targets)
        for optimizer in trainer.optimizers:
            optimizer.zero_grad(set_to_none=True)
    for (_, a), (_, b) in zip(reference.parallel.moe_layers, other.parallel.moe_layers):
        assert a.tokens_per_expert.sum() == inputs.numel() * a.top_k
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
        torch.testing.assert_close(a.aux_loss_sum, b.aux_loss_sum, rtol=1e-6, atol=0)
    reference.parallel.expert_statistics(), other.parallel.expert_statistics()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_counts_once_and_keeps_the_aux_gradient(tmp_path, byte_data, mode):
    extra = ["--model.aux_loss_coef=0.1", "--model.bias_update_rate=0.01"]
    plain = moe_trainer(tmp_path / "a", byte_data, *extra)
    recomputed = moe_trainer(tmp_path / "b", byte_data, *extra, f"--train.activation_checkpointing={mode}")
    assert_counts_once(plain, recomputed)
    for _ in range(2):
        inputs, targets = plain.loader.next_batch()
        assert plain.train_step(inputs, targets, lr=1e-3) == recomputed.train_step(inputs, targets, lr=1e-3)
        assert plain.moe_record == recomputed.moe_record
    for (name, p), (_, q) in zip(plain.model.state_dict().items(), recomputed.model.state_dict().items()):
        assert torch.equal(p, q), name


def test_compile_counts_once_and_keeps_the_aux_gradient(tmp_path, byte_data):
    # Compiled blocks trace MoE._record's recompute guard and AddAuxiliaryLoss (checked with
    # activation checkpointing as well while building this; one case here: compiling is slow on CPU).
    extra = ["--model.aux_loss_coef=0.1", "--model.bias_update_rate=0.01"]
    eager = moe_trainer(tmp_path / "a", byte_data, *extra)
    compiled = moe_trainer(tmp_path / "b", byte_data, *extra, "--train.compile=true")
    assert_counts_once(eager, compiled)
    inputs, targets = eager.loader.next_batch()
    loss, norm, _ = eager.train_step(inputs, targets, lr=1e-3)
    loss_compiled, norm_compiled, _ = compiled.train_step(inputs, targets, lr=1e-3)
    assert loss_compiled == pytest.approx(loss, rel=1e-5) and norm_compiled == pytest.approx(norm, rel=1e-5)
    assert compiled.moe_record["expert_load"] == eager.moe_record["expert_load"]
    assert compiled.moe_record["aux_loss"] == pytest.approx(eager.moe_record["aux_loss"], rel=1e-5)

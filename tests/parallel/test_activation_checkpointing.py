"""Activation checkpointing trades compute for memory and nothing else: the loss and every
gradient are those of the plain model. 'selective' is op-level, as the planner models it: the
backward replays the cheap ops but no matmul."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import Transformer
from gigatrain.parallel import apply_activation_checkpointing, plain_name


class CountOps(TorchDispatchMode):
    """The matmuls and the other ops a backward pass runs."""

    def __init__(self):
        super().__init__()
        self.matmuls = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.matmuls += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


def loss_grads_and_backward_ops(model, inputs, targets):
    logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    with CountOps() as counter:
        loss.backward()
    return loss.detach(), {plain_name(n): p.grad for n, p in model.named_parameters()}, counter


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).float()
    inputs = torch.randint(0, model.args.vocab_size, (2, 32))
    return model, inputs, torch.roll(inputs, -1, dims=1)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_gives_the_loss_and_gradients_of_none(tiny, mode):
    model, inputs, targets = tiny
    plain_loss, plain_grads, plain_ops = loss_grads_and_backward_ops(copy.deepcopy(model), inputs, targets)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed, mode)
    loss, grads, ops = loss_grads_and_backward_ops(checkpointed, inputs, targets)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=0, msg=name)
    assert ops.others > plain_ops.others  # the cheap ops are replayed in the backward
    if mode == "selective":
        assert ops.matmuls == plain_ops.matmuls  # matmul outputs were kept: the backward replays none
    else:
        assert ops.matmuls > plain_ops.matmuls  # the whole forward of each block is replayed

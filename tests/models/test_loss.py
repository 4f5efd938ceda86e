import math

import pytest
import torch
import torch.nn.functional as F

from gigatrain.models import loss
from gigatrain.models.loss import chunked_cross_entropy, loss_fn


def test_loss_is_fp32_cross_entropy_per_token_whatever_the_logits_dtype():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.equal(loss_fn(logits, targets), expected)
    assert loss_fn(logits.bfloat16(), targets).dtype == torch.float32
    assert math.isclose(loss_fn(logits, targets, reduction="sum").item(), 10 * expected.item(), rel_tol=1e-6)


def _graph_names(tensor: torch.Tensor) -> set[str]:
    """The names of the backward nodes behind `tensor`."""
    names, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor, reduction: str):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, targets, reduction)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_cross_entropy_gives_the_plain_loss_and_gradient_in_fp32(reduction):
    """Several chunks, the last one short, and padding (-100) in and across chunks."""
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(37, 101, generator=generator, dtype=torch.float64).float()
    targets = torch.randint(0, 101, (37,), generator=generator)
    targets[[0, 5, 6, 7, 36]] = -100
    plain = _loss_and_grad(lambda x, t, r: F.cross_entropy(x, t, reduction=r), logits, targets, reduction)
    for chunk_logits in (101 * 4, 101 * 37, 101 * 1000):  # 4 tokens a chunk, one chunk, one larger than the batch
        chunked = _loss_and_grad(lambda x, t, r: chunked_cross_entropy(x, t, r, chunk_logits=chunk_logits),
                                 logits, targets, reduction)
        assert math.isclose(chunked[0].item(), plain[0].item(), rel_tol=1e-6)
        torch.testing.assert_close(chunked[1], plain[1], rtol=1e-6, atol=1e-7)
        assert (chunked[1][[0, 5, 6, 7, 36]] == 0).all()


def test_chunked_cross_entropy_keeps_the_logits_dtype_for_the_gradient():
    """bf16 logits: the loss is computed in fp32 and the gradient comes back in bf16, as the
    plain path's does, and equal to it up to bf16 rounding."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 64, generator=generator).bfloat16()
    targets = torch.randint(0, 64, (16,), generator=generator)
    plain = _loss_and_grad(lambda x, t, r: F.cross_entropy(x.float(), t, reduction=r), logits, targets, "mean")
    chunked = _loss_and_grad(lambda x, t, r: chunked_cross_entropy(x, t, r, chunk_logits=64 * 5), logits, targets, "mean")
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == torch.bfloat16
    assert math.isclose(chunked[0].item(), plain[0].item(), rel_tol=1e-6)
    torch.testing.assert_close(chunked[1].float(), plain[1].float(), rtol=1e-2, atol=1e-4)


def test_loss_fn_takes_the_chunks_only_for_large_logits(monkeypatch):
    """Small logits (every golden run) keep the plain path, bit for bit; at the threshold the
    chunks take over with the same value, and a padded all-ignored batch is NaN either way."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (2, 6), generator=generator)
    targets[1, 4:] = -100
    assert "_ChunkedCrossEntropyBackward" not in _graph_names(loss_fn(logits, targets))
    monkeypatch.setattr(loss, "CHUNKED_MIN_LOGITS", logits.numel())
    monkeypatch.setattr(loss, "CHUNK_LOGITS", 50 * 5)
    chunked = loss_fn(logits, targets)
    assert "_ChunkedCrossEntropyBackward" in _graph_names(chunked)
    assert math.isclose(chunked.item(), F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), rel_tol=1e-6)
    assert loss_fn(logits, torch.full_like(targets, -100)).isnan()

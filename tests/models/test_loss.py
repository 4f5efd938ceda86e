import math

import torch
import torch.nn.functional as F

from gigatrain.models.loss import loss_fn


def test_loss_is_fp32_cross_entropy_per_token_whatever_the_logits_dtype():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.equal(loss_fn(logits, targets), expected)
    assert loss_fn(logits.bfloat16(), targets).dtype == torch.float32
    assert math.isclose(loss_fn(logits, targets, reduction="sum").item(), 10 * expected.item(), rel_tol=1e-6)

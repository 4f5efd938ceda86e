"""Expert load balancing after each optimizer step, and the router statistics of the step.

The auxiliary-loss-free balancing of DeepSeek-V3: after each step, every MoE layer's router
bias moves each expert by `bias_update_rate` towards balance, up if it received fewer than the
mean number of tokens, down if more: expert_bias += rate * sign(mean count - count). The
counts are the whole global batch's (every micro-batch, every rank's tokens: see
`ParallelModel.expert_statistics`), so every rank applies the same update to its copy of the
bias and a parallel run moves it exactly as one process does. (The auxiliary loss, the other
way to balance, is part of the layer's backward: models/moe.py.)
"""

from __future__ import annotations

import torch

from gigatrain.parallel import ParallelModel


class ExpertBalance:
    def __init__(self, parallel: ParallelModel):
        args = parallel.parts[0].args
        self.parallel, self.n_experts = parallel, args.n_experts
        self.bias_update_rate, self.has_aux_loss = args.bias_update_rate, args.aux_loss_coef > 0

    @torch.no_grad()
    def after_step(self, applied: bool) -> dict:
        """Move the biases (if the step's update was `applied`; a skipped update leaves the
        model as it was), reset the counts, and return the step's metrics.jsonl fields:
        expert_load (per MoE layer, the busiest expert's tokens over the mean), its mean over
        layers expert_load_max, and with an auxiliary loss aux_loss (unweighted, mean over
        layers and sequences; 1.0 is perfect balance)."""
        stats = self.parallel.expert_statistics()
        counts = stats[:, :self.n_experts]
        mean = counts.mean(dim=-1, keepdim=True)
        if applied and self.bias_update_rate:
            row = {layer: index for index, layer in enumerate(self.parallel.moe_layer_ids)}
            for layer, moe in self.parallel.moe_layers:
                moe.router.expert_bias += self.bias_update_rate * torch.sign(mean[row[layer], 0] - counts[row[layer]])
        load = counts.amax(dim=-1) / mean.squeeze(-1)
        aux = stats[:, self.n_experts].sum() / stats[:, self.n_experts + 1].sum()
        values = torch.cat([load, aux.view(1)]).tolist()  # the one device-to-host copy
        record = {"expert_load_max": sum(values[:-1]) / len(load), "expert_load": values[:-1]}
        if self.has_aux_loss:
            record["aux_loss"] = values[-1]
        return record

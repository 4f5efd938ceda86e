"""The numerical guard: decide, from the global loss and gradient norm that every rank
shares, whether an update is safe to apply.

A NaN or Inf, or a loss far above the recent mean (a spike), skips the update: the batch is
consumed, the weights and optimizer state stay as they were. `rollback_after` skips in a row
ask the trainer to roll back to the last checkpoint and go on past the offending data;
more than `max_rollbacks` rollbacks mean the run is diverging and should stop.
"""

from __future__ import annotations

import math
from collections import deque

from gigatrain.config import FaultConfig


class NumericalGuard:
    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)
        self.consecutive = 0
        self.rollbacks = 0

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why this update must be skipped ('nan', 'spike'), or None to apply it."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = "nan"
        elif (self.cfg.loss_spike_factor and len(self.recent) == self.recent.maxlen
              and loss > self.cfg.loss_spike_factor * self.mean()):
            reason = "spike"
        else:
            self.recent.append(loss)
            self.consecutive = 0
            return None
        self.consecutive += 1
        return reason

    def mean(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else math.nan

    @property
    def wants_rollback(self) -> bool:
        return self.consecutive >= self.cfg.rollback_after

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.consecutive = 0
        self.recent.clear()  # the restored weights had other losses


class TrainingDiverged(RuntimeError):
    """Numerical faults persisted through rollbacks; the message says what was tried."""

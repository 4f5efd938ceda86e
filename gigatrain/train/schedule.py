"""Learning-rate schedules: linear warm-up, then cosine, warmup-stable-decay, or constant.

A schedule runs over a horizon of `horizon` steps, fixed when a run starts (the trainer keeps
it in every checkpoint): a resumed run with a higher train.max_steps continues at the final
rate instead of stretching the decay over the new length, which would raise the rate again.
train.schedule_steps sets the horizon explicitly, and only it moves the horizon of a run.
"""

from __future__ import annotations

import math

from gigatrain.config import TrainConfig


def schedule_horizon(cfg: TrainConfig, saved: int | None) -> int:
    """The horizon of a run: train.schedule_steps if set, else the one its first process fixed
    (`saved`, from the checkpoint), else train.max_steps (a new run)."""
    return cfg.schedule_steps or saved or cfg.max_steps


def lr_at(step: int, cfg: TrainConfig, horizon: int | None = None) -> float:
    """Learning rate for optimizer step `step` (1-based) of a schedule over `horizon` steps
    (default train.max_steps); past the horizon, the final rate."""
    horizon = horizon or cfg.max_steps
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return peak * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, horizon - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of steps.
    decay_steps = max(1, round(cfg.decay_fraction * horizon))
    decay_start = horizon - decay_steps
    if step <= decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / decay_steps)
    return peak + (floor - peak) * progress

import math

import pytest

from gigatrain.config import TrainConfig
from gigatrain.train.schedule import lr_at, schedule_horizon


def test_cosine():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(1, cfg) == 0.1
    assert lr_at(10, cfg) == 1.0
    assert math.isclose(lr_at(60, cfg), 0.1 + 0.9 * 0.5)
    assert math.isclose(lr_at(110, cfg), 0.1)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, cfg) == 1.0 and lr_at(80, cfg) == 1.0
    assert math.isclose(lr_at(90, cfg), 0.5)
    assert lr_at(100, cfg) == 0.0


def test_constant():
    cfg = TrainConfig(lr=0.5, warmup_steps=0, max_steps=10, schedule="constant")
    assert [lr_at(s, cfg) for s in (1, 5, 10)] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_past_its_horizon_a_schedule_stays_at_the_final_rate(schedule):
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=120, schedule=schedule)
    assert [lr_at(s, cfg, horizon=100) for s in (100, 101, 120)] == pytest.approx([0.1, 0.1, 0.1])
    assert lr_at(101, cfg) > 0.1  # over max_steps itself, the decay is not over at step 101


def test_the_horizon_is_fixed_at_the_start_unless_set():
    assert schedule_horizon(TrainConfig(max_steps=120), saved=None) == 120  # a new run
    assert schedule_horizon(TrainConfig(max_steps=120), saved=100) == 100  # resumed with a raised max_steps
    assert schedule_horizon(TrainConfig(max_steps=120, schedule_steps=150), saved=100) == 150  # an explicit re-decay

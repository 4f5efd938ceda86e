import math

from gigatrain.config import TrainConfig
from gigatrain.train.schedule import lr_at


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

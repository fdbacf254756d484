"""Learning-rate schedule per optimizer step: warm-up, multistep, cosine."""

import math

import pytest

from utils.engine import steps_lr_lambda


def test_linear_warmup_then_multistep():
    factor = steps_lr_lambda(total_steps=100, steps_per_epoch=10, warmup_epochs=0.5, schedule="multistep",
                             milestones=[3, 7], gamma=0.1, min_lr_ratio=0.0)  # fmt: skip
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(29) == 1.0 and factor(30) == pytest.approx(0.1)
    assert factor(69) == pytest.approx(0.1) and factor(70) == pytest.approx(0.01)


def test_cosine_reaches_the_floor():
    factor = steps_lr_lambda(total_steps=110, steps_per_epoch=10, warmup_epochs=1.0, schedule="cosine",
                             milestones=[], gamma=0.1, min_lr_ratio=0.1)  # fmt: skip
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)


def test_a_short_positive_warmup_takes_at_least_one_step():
    factor = steps_lr_lambda(total_steps=40, steps_per_epoch=10, warmup_epochs=0.04, schedule="multistep",
                             milestones=[], gamma=0.1, min_lr_ratio=0.0)
    assert factor(0) == 1.0  # one warm-up step of 1/1, where round(0.4) would have made none
    zero = steps_lr_lambda(total_steps=40, steps_per_epoch=10, warmup_epochs=0.0, schedule="multistep",
                           milestones=[], gamma=0.1, min_lr_ratio=0.0)
    assert zero(0) == 1.0
    two = steps_lr_lambda(total_steps=40, steps_per_epoch=10, warmup_epochs=0.2, schedule="multistep",
                          milestones=[], gamma=0.1, min_lr_ratio=0.0)
    assert [two(0), two(1)] == [0.5, 1.0]

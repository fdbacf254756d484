import pytest
import torch
from torch import nn

from utils.ema import ModelEMA


def test_ema_follows_hand_computed_average():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.9, 2/11)
    expected = 1.0 - 2 / 11
    assert ema.module.weight.item() == pytest.approx(expected)
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9)
    assert ema.module.weight.item() == pytest.approx(1.0, abs=1e-6)


def test_ema_copies_buffers_and_round_trips():
    model = nn.BatchNorm1d(2)
    model(torch.randn(8, 2))
    ema = ModelEMA(model, decay=0.99)
    model(torch.randn(8, 2) + 5)
    ema.update(model)
    assert torch.equal(ema.module.running_mean, model.running_mean)
    other = ModelEMA(nn.BatchNorm1d(2), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.module.running_mean, model.running_mean)


def test_bad_decay_names_the_key():
    with pytest.raises(ValueError, match="train.ema_decay"):
        ModelEMA(nn.Linear(1, 1), decay=1.0)

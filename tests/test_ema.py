"""EMA of model weights: warmup, the average itself, state round trip, errors."""
import pytest
import torch
from torch import nn

from latentloom.training.ema import EMA, ema_decay_at


def test_decay_warms_up_then_caps():
    assert ema_decay_at(0, max_decay=0.999) == pytest.approx(0.1)
    assert ema_decay_at(10, max_decay=0.999) == pytest.approx(11 / 20)
    assert ema_decay_at(10**7, max_decay=0.999) == 0.999


def test_update_is_the_exponential_average():
    model = nn.Linear(3, 2)
    ema = EMA(model, max_decay=0.5)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model)
        d = ema_decay_at(step, max_decay=0.5)
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n])
    target = nn.Linear(3, 2)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, expected["weight"])


def test_frozen_parameters_are_not_tracked():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    assert set(EMA(model).shadow) == {"1.weight", "1.bias"}


def test_state_dict_round_trip():
    model = nn.Linear(3, 2)
    ema = EMA(model, max_decay=0.9)
    for _ in range(3):
        ema.update(model)
    other = EMA(nn.Linear(3, 2), max_decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.step == 3
    for n in ema.shadow:
        torch.testing.assert_close(other.shadow[n], ema.shadow[n])


def test_errors():
    with pytest.raises(ValueError, match="max_decay"):
        EMA(nn.Linear(1, 1), max_decay=1.0)
    with pytest.raises(ValueError, match="no.*requires_grad|none has requires_grad"):
        EMA(nn.Linear(1, 1).requires_grad_(False))
    with pytest.raises(ValueError, match="does not match"):
        EMA(nn.Linear(1, 1)).load_state_dict(EMA(nn.Linear(1, 2, bias=False)).state_dict())
    with pytest.raises(ValueError, match="lacks"):
        EMA(nn.Linear(1, 1)).copy_to(nn.Linear(1, 1, bias=False))

"""Model and data factories that tests name by import path (``tests.factories:...``) in configs."""

from __future__ import annotations

import torch
from torch import nn


class _Raises(nn.Module):
    """Trains normally for a few steps, then fails the way a buggy model does."""

    def __init__(self, in_features: int, out_features: int, fail_after: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, out_features))
        self.calls, self.fail_after = 0, fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("deliberate failure in forward (tests.factories)")
        return self.net(x)


def model_that_raises(in_features: int = 64, out_features: int = 10, fail_after: int = 30) -> nn.Module:
    return _Raises(in_features, out_features, fail_after)


# --------------------------------------------------------------------------- health scenarios
# Real models and data that reliably provoke one health rule each (tests/test_health_scenarios.py).


def mlp_with_dead_layer(in_features: int = 64, out_features: int = 10, hidden: tuple[int, ...] = (64, 64),
                        dead: str = "fc2", bias: float = -10.0) -> nn.Module:
    """The built-in MLP with layer ``dead``'s bias pushed to ``bias``: its pre-activations are
    negative for every input, so the ReLU after it outputs exactly 0 and no gradient revives it."""
    from tbhealth.training.models import MLP

    model = MLP(in_features, out_features, hidden=list(hidden))
    with torch.no_grad():
        getattr(model, dead).bias.fill_(bias)
    return model


def few_digits(n_train: int = 50, val_fraction: float = 0.2, seed: int | None = 0):
    """The built-in digits with only ``n_train`` training samples (validation keeps its full
    share): a large model memorises them while validation accuracy stays far behind."""
    from torch.utils.data import TensorDataset

    from tbhealth.training.data import digits

    train, val = digits(val_fraction=val_fraction, seed=seed)
    small = TensorDataset(*(t[:n_train] for t in train.tensors))
    small.num_classes = train.num_classes
    return small, val


def xor_quadrants(n_samples: int = 1024, val_fraction: float = 0.25, seed: int | None = 0):
    """Points uniform in [-1, 1]², class 1 where x·y > 0 (XOR of the signs). No straight line
    separates the classes, so a linear model stays at chance (loss ≈ ln 2 ≈ 0.69, accuracy ≈ 50 %)."""
    from tbhealth.training.data import split

    g = torch.Generator().manual_seed(0 if seed is None else seed)
    x = torch.rand(n_samples, 2, generator=g) * 2 - 1
    y = (x[:, 0] * x[:, 1] > 0).long()
    return split(x, y, val_fraction, seed, num_classes=2)

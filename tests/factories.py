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

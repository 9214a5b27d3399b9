"""Models for the distributed tests that misbehave on one rank only (named by import path)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _OnRank(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, after: int, mode: str):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, out_features))
        self.rank, self.after, self.mode, self.calls = rank, after, mode, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not self.training or dist.get_rank() != self.rank:
            return out
        self.calls += 1
        if self.calls == self.after:
            if self.mode == "crash":
                raise RuntimeError(f"deliberate failure on rank {self.rank}")
            return out * float("nan")
        return out


def nan_on_rank(in_features: int = 64, out_features: int = 10, rank: int = 1, after: int = 8) -> nn.Module:
    return _OnRank(in_features, out_features, rank, after, "nan")


def crash_on_rank(in_features: int = 64, out_features: int = 10, rank: int = 1, after: int = 8) -> nn.Module:
    return _OnRank(in_features, out_features, rank, after, "crash")

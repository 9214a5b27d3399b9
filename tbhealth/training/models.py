"""Built-in models (a multilayer perceptron and a small CNN, sized for the built-in data), and the
module that wraps a plain loss function.

Activations are modules (not ``torch.nn.functional`` calls) with names such as ``act1`` so the
health engine's forward hooks see every activation and its messages name the layer. Bad
arguments raise ``ValueError`` naming the argument and what is allowed.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "CNN", "FunctionLoss", "MLP", "NORMS"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
NORMS = ("none", "batch", "layer")


def _choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(allowed)} (got {value!r}).{hint}")
    return value  # type: ignore[return-value]


def _size(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer (got {value!r})")
    return value


def _sizes(name: str, value: object) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of positive integers, e.g. [128, 64] (got {value!r})")
    return [_size(f"{name}[{i}]", v) for i, v in enumerate(value)]


def _dropout(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"dropout must be a probability in [0, 1) (got {value!r})")
    return float(value)


class MLP(nn.Sequential):
    """Flatten, then ``hidden`` blocks of Linear → norm → activation → dropout, then a Linear head."""

    def __init__(
        self, in_features: int, out_features: int, hidden: Sequence[int] = (128, 64),
        activation: str = "relu", dropout: float = 0.0, norm: str = "none",
    ):
        width, sizes = _size("in_features", in_features), _sizes("hidden", hidden)
        act = ACTIVATIONS[_choice("activation", activation, list(ACTIVATIONS))]
        norm, p = _choice("norm", norm, NORMS), _dropout(dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for i, size in enumerate(sizes, 1):
            layers[f"fc{i}"] = nn.Linear(width, size)
            if norm != "none":
                layers[f"norm{i}"] = nn.BatchNorm1d(size) if norm == "batch" else nn.LayerNorm(size)
            layers[f"act{i}"] = act()
            if p:
                layers[f"drop{i}"] = nn.Dropout(p)
            width = size
        layers["out"] = nn.Linear(width, _size("out_features", out_features))
        super().__init__(layers)


class CNN(nn.Module):
    """Conv blocks (conv → norm → activation, 2×2 max-pool between blocks), then a linear head.

    The head pools to 2×2 whatever the input size, so any ``channels`` list works on 8×8
    digits (pooling rounds up and never shrinks below 1×1). Inputs of shape (N, H, W) get a
    channel axis.
    """

    def __init__(
        self, in_channels: int, out_features: int | None = None, channels: Sequence[int] = (16, 32),
        activation: str = "relu", dropout: float = 0.0, norm: str = "none", kernel_size: int = 3,
        num_classes: int | None = None,
    ):
        super().__init__()
        if out_features is not None and num_classes is not None and out_features != num_classes:
            raise ValueError(f"out_features ({out_features}) and num_classes ({num_classes}) disagree; give one")
        out = _size("out_features", out_features if out_features is not None else num_classes)
        sizes, k = _sizes("channels", channels), _size("kernel_size", kernel_size)
        if not sizes:
            raise ValueError("channels must list at least one conv layer, e.g. [16, 32]")
        act = ACTIVATIONS[_choice("activation", activation, list(ACTIVATIONS))]
        norm, p = _choice("norm", norm, NORMS), _dropout(dropout)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        width = _size("in_channels", in_channels)
        for i, size in enumerate(sizes, 1):
            blocks[f"conv{i}"] = nn.Conv2d(width, size, k, padding=k // 2)
            if norm != "none":
                blocks[f"norm{i}"] = nn.BatchNorm2d(size) if norm == "batch" else nn.GroupNorm(1, size)
            blocks[f"act{i}"] = act()
            if i < len(sizes):
                blocks[f"pool{i}"] = nn.MaxPool2d(2, ceil_mode=True)
            width = size
        self.features = nn.Sequential(blocks)
        head: OrderedDict[str, nn.Module] = OrderedDict(pool=nn.AdaptiveAvgPool2d(2), flatten=nn.Flatten())
        if p:
            head["drop"] = nn.Dropout(p)
        head["out"] = nn.Linear(width * 4, out)
        self.head = nn.Sequential(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class FunctionLoss(nn.Module):
    """A loss function ``fn(prediction, target) -> tensor`` as a module, like torch.nn's losses."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(prediction, target)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

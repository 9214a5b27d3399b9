"""Offline data for the health scenarios: ``(train, val)`` TensorDatasets, deterministic by seed."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from tbhealth.training.data import digits, split


def few_digits(n_train: int = 90, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Digits with only ``n_train`` training samples; validation keeps 20 % of the whole set."""
    train, val = digits(val_fraction=0.2, seed=seed)
    return TensorDataset(*(t[:n_train] for t in train.tensors)), val


def rings(n: int = 1200, noise: float = 0.08, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Two concentric rings (class = ring): no straight line separates them, so a linear model
    sits at chance (loss ≈ ln 2) with nothing to overfit."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    angle = torch.rand(n, generator=g) * 2 * math.pi
    radius = torch.where(y == 1, 0.5, 1.0) + noise * torch.randn(n, generator=g)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    return split(x, y, 0.25, seed, num_classes=2)


def blobs(n: int = 6000, classes: int = 4, features: int = 10, spread: float = 1.6, seed: int = 0):
    """Overlapping Gaussian blobs: plenty of data and a noise floor (~80 % accuracy at spread 3) that
    a small model reaches early; training longer changes nothing: the point of a long converged run."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 1.2
    y = torch.arange(n) % classes
    x = centres[y] + spread * torch.randn(n, features, generator=g) / math.sqrt(features) * 2
    return split(x, y, 0.2, seed, num_classes=classes)


def exact_regression(n: int = 1024, features: int = 6, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """A noiseless linear target: a model drives the loss to ~0 (1e-6 and below), where tiny
    absolute wobbles are large ratios."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x @ torch.randn(features, 1, generator=g) + 0.5
    return split(x, y, 0.2, seed)


def markov_text(n_seq: int = 384, length: int = 24, vocab: int = 12, seed: int = 0):
    """Token sequences from a sparse random Markov chain; inputs are tokens, targets the next
    tokens, shape (N, T): accuracy must be counted over N × T predictions, not N samples."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    probs = torch.softmax(logits, 1)
    seq = torch.empty(n_seq, length + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (n_seq,), generator=g)
    for t in range(length):
        seq[:, t + 1] = torch.multinomial(probs[seq[:, t]], 1, generator=g).squeeze(1)
    return split(seq[:, :-1], seq[:, 1:], 0.25, seed, num_classes=vocab)

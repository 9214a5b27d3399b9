"""Built-in data that needs no download: a real small data set and two synthetic ones.

Each function returns ``(train, val)`` ``TensorDataset``s split deterministically by ``seed``
(``None``: a fresh random seed), so two runs with one seed see the same samples in the same
split. Classification sets carry ``num_classes`` so the model's output size needs no label scan.
Bad arguments raise ``ValueError`` naming the argument; the registry turns that into a config
error under ``data.kwargs``. :func:`count_classes` tells the registry how many outputs any
classification dataset needs.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["count_classes", "digits", "split", "synthetic_classification", "synthetic_regression"]

_SCAN_LIMIT = 50_000


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int | None,
          num_classes: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """Shuffle by ``seed`` and hold out ``val_fraction`` of the samples (at least one each side)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, exclusive (got {val_fraction!r})")
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 samples to split into train and val (got {n})")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=_generator(seed))
    train = TensorDataset(x[order[n_val:]], y[order[n_val:]])
    val = TensorDataset(x[order[:n_val]], y[order[:n_val]])
    if num_classes is not None:
        train.num_classes = val.num_classes = num_classes
    return train, val


def _at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low} (got {value!r})")


def _non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (got {value!r})")


def digits(val_fraction: float = 0.2, seed: int | None = 0, as_images: bool = False) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 samples, 10 classes; read from disk).

    Pixels are scaled from 0–16 to 0–1. ``as_images``: samples are 1×8×8 (for ``cnn``), else 64
    flat features (for ``mlp``).
    """
    x, y = _digits_tensors()
    if as_images:
        x = x.reshape(-1, 1, 8, 8)
    return split(x, y, val_fraction, seed, num_classes=10)


@lru_cache(maxsize=1)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    # Later calls (tests, resumed runs) reuse the tensors, which no caller mutates (indexing in
    # split() copies).
    x_np, y_np = _read_digits()
    return torch.from_numpy(x_np).float() / 16.0, torch.from_numpy(y_np).long()


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``load_digits(return_X_y=True)`` gives them, read from the file scikit-learn ships.

    ``import sklearn`` costs ~2 s of start-up (it loads scipy); the data is one small gzipped CSV
    inside the package (pixels, then the label, per row), found here without importing it.
    Should a scikit-learn release move the file, ``load_digits`` still does the job.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next((p for p in (Path(f, "datasets", "data", "digits.csv.gz") for f in folders) if p.is_file()), None)
    if path is None:
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def synthetic_classification(
    n_samples: int = 2000, n_features: int = 20, n_classes: int = 4, separation: float = 2.0,
    noise: float = 1.0, val_fraction: float = 0.2, seed: int | None = 0,
) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian blobs: one random centre per class, ``separation`` apart on average, ``noise`` spread.

    Larger ``separation``/``noise`` ratios are easier; ``separation: 0`` is unlearnable (labels
    independent of inputs), which is a handy way to provoke the underfitting rule.
    """
    _at_least("n_samples", n_samples, 2)
    _at_least("n_features", n_features, 1)
    _at_least("n_classes", n_classes, 2)
    _non_negative("separation", separation)
    _non_negative("noise", noise)
    g = _generator(seed)
    centres = torch.randn(n_classes, n_features, generator=g) * separation
    y = torch.arange(n_samples) % n_classes
    x = centres[y] + noise * torch.randn(n_samples, n_features, generator=g)
    return split(x, y, val_fraction, seed, num_classes=n_classes)


def synthetic_regression(
    n_samples: int = 2000, n_features: int = 8, noise: float = 0.1, val_fraction: float = 0.2,
    seed: int | None = 0,
) -> tuple[TensorDataset, TensorDataset]:
    """Targets of shape (1,): a linear part plus a smooth nonlinear part plus Gaussian ``noise``.

    The nonlinear part (a sine of one feature, a product of two) is what a linear model cannot
    fit, so an MLP visibly beats a linear baseline; ``noise`` sets the loss floor (≈ noise²).
    """
    _at_least("n_samples", n_samples, 2)
    _at_least("n_features", n_features, 1)
    _non_negative("noise", noise)
    g = _generator(seed)
    x = torch.randn(n_samples, n_features, generator=g)
    w = torch.randn(n_features, generator=g) / n_features ** 0.5
    y = x @ w + 0.5 * torch.sin(2.0 * x[:, 0])
    if n_features >= 2:
        y = y + 0.3 * x[:, 0] * x[:, 1]
    y = y + noise * torch.randn(n_samples, generator=g)
    return split(x, y.unsqueeze(1), val_fraction, seed)


def count_classes(train: Dataset, val: Dataset) -> int | None:
    """Outputs a classifier needs: a ``num_classes``/``classes`` attribute, else counted from the labels.

    Float labels (one-hot, multi-label, binary) mean one output per column. None when unknown
    (a dataset of an unknown type larger than ``_SCAN_LIMIT`` samples, read one by one).
    """
    for ds in (train, val):
        if isinstance(getattr(ds, "num_classes", None), int):
            return ds.num_classes
        if isinstance(getattr(ds, "classes", None), (list, tuple)):
            return len(ds.classes)
    labels = []
    for ds in (train, val):
        if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
            labels.append(ds.tensors[1])
        elif isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
            labels.append(ds.dataset.tensors[1][list(ds.indices)])
        elif len(ds) <= _SCAN_LIMIT:
            labels.append(torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))]) if len(ds) else None)
        else:
            return None
    labels = [t for t in labels if t is not None and t.numel()]
    if not labels:
        return None
    if labels[0].is_floating_point():  # one-hot / multi-label / binary targets: one output per column
        return labels[0].shape[1] if labels[0].ndim == 2 else 1
    return int(max(int(t.max()) for t in labels)) + 1

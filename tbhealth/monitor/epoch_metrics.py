"""An epoch's metrics as the loop reported them, made plain and sane before anyone judges them.

Pure: no torch import needed (a tensor is read through ``.item()``), no I/O. An accuracy is a
fraction 0–1; a value outside that is a loop counting the wrong thing (``correct`` counts tokens
of ``(N, T)`` sequence targets while ``n`` counts samples), and a rule fed 2362 % would raise a
bogus alert, so such a value is refused with a warning that says how to count instead.
"""

from __future__ import annotations

from typing import Any

from tbhealth.run.status import METRIC_KEYS


def as_float(v: Any) -> float | None:
    """A Python float (a tensor read once) or None."""
    return None if v is None else float(v.item() if hasattr(v, "item") else v)


def current_lr(optimizer: Any, lr: Any = None) -> float | None:
    """The rate the loop passed, else the optimizer's first group's now (None without either)."""
    if lr is None and optimizer is not None:
        lr = optimizer.param_groups[0]["lr"]
    return as_float(lr)


def fraction(name: str, acc: Any, count: float | None) -> tuple[float | None, str | None]:
    """``(acc, None)`` if ``acc`` is a fraction 0–1 (or unknown, or NaN), else ``(None, why)``;
    ``count``: the predictions it was measured over, when known (names the likely mistake)."""
    value = as_float(acc)
    if value is None or 0.0 <= value <= 1.0 or value != value:
        return value, None
    why = (f"correct ({value * count:.0f}) > n ({count:.0f}): pass n = the number of predictions "
           "`correct` counts (tokens for (N, T) sequence targets)" if count else "accuracies are fractions 0–1")
    return None, f"{name} {value:.4g} not recorded: {why}"


def epoch_metrics(*, train_loss: Any, train_acc: Any, train_count: float | None, val_loss: Any, val_acc: Any,
                  val_count: int | None, lr: Any) -> tuple[dict[str, float | None], list[str]]:
    """The ``METRIC_KEYS`` of one epoch as floats (None where unknown), and a warning per refused value."""
    train_acc, why_train = fraction("train_acc", train_acc, train_count)
    val_acc, why_val = fraction("val_acc", val_acc, val_count)
    warnings = [w for w in (why_train, why_val) if w]
    given = {"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc, "lr": lr}
    return {k: as_float(given[k]) for k in METRIC_KEYS}, warnings

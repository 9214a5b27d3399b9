"""Rules over finished epochs: overfitting, underfitting, plateau. Pure: see :mod:`findings`.

Epoch metrics are noisy (a validation set of a few hundred samples moves its accuracy by points
from one epoch to the next), so each rule asks for a change larger than that noise and for it to
last, and none fires on a model that has nothing to show: a model at chance cannot overfit, a run
that cut its loss tenfold is converged, not stuck.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tbhealth.health import settings as hs
from tbhealth.health.findings import (
    CLEAR, FIRING, HOLDING, Compare, EpochMetrics, Finding, Observation, epochs_since_best, finding, finite, fmt, pct,
)
from tbhealth.health.step_rules import ORDER


#: A sub-test's verdict: (status, what was compared, value, threshold).
Verdict = tuple[str, str, float, float]


def _rising_val_loss(validated: Sequence[EpochMetrics], s: hs.OverfittingSettings) -> Verdict | None:
    """Val loss rose ``patience`` epochs in a row, by more than ``min_rise`` in total, while train
    loss < val loss. Holds while val loss stays more than ``min_rise`` above its best."""
    last = validated[-1] if validated else None
    if len(validated) < 2 or not finite(last.train_loss):
        return None
    val = [e.val_loss for e in validated]
    rises = 0
    while rises + 1 < len(val) and val[-1 - rises] > val[-2 - rises]:
        rises += 1
    start, best = val[-1 - rises], min(val)
    rise = (val[-1] - start) / abs(start) if start else math.inf
    limit = best * (1 + s.min_rise) if best > 0 else best
    if last.train_loss >= last.val_loss:
        return CLEAR, f"val loss {fmt(last.val_loss)} not above train loss {fmt(last.train_loss)}", last.val_loss, limit
    if rises >= s.patience and rise > s.min_rise:
        trail = " -> ".join(fmt(v) for v in val[-rises - 1:])
        return FIRING, (f"Overfitting: val loss rose {rises} epochs in a row {Compare.AT_LEAST.symbol} {s.patience} "
                        f"({trail}; +{pct(rise)} > {pct(s.min_rise)}) while train loss {fmt(last.train_loss)} < "
                        f"val loss {fmt(last.val_loss)}"), float(rises), float(s.patience)
    versus = f"val loss {fmt(last.val_loss)} {{}} {fmt(1 + s.min_rise)} × its best {fmt(best)} ({fmt(limit)})"
    if last.val_loss > limit:
        return HOLDING, "Overfitting, not yet cleared: " + versus.format(">") + " while train loss < val loss", \
            last.val_loss, limit
    return CLEAR, versus.format("<="), last.val_loss, limit


def _z(e: EpochMetrics) -> float | None:
    """The accuracy gap in standard errors of a difference of two proportions; None: sizes unknown."""
    if not e.train_count or not e.val_count:
        return None
    var = e.train_acc * (1 - e.train_acc) / e.train_count + e.val_acc * (1 - e.val_acc) / e.val_count
    gap = e.train_acc - e.val_acc
    return math.inf if var <= 0 and gap > 0 else (gap / math.sqrt(var) if var > 0 else 0.0)


def _significant_gap(e: EpochMetrics, s: hs.OverfittingSettings) -> bool:
    """Larger than the threshold, than validation noise, and shown by a model that fits."""
    gap, z = e.train_acc - e.val_acc, _z(e)
    fits = 1 - e.train_acc <= s.max_error_ratio * (1 - e.val_acc)
    return Compare.ABOVE.holds(gap, s.acc_gap) and (z is None or z > s.min_z) and fits


def _accuracy_gap(epochs: Sequence[EpochMetrics], s: hs.OverfittingSettings) -> Verdict | None:
    """train acc − val acc significant (see :func:`_significant_gap`) in ``gap_patience`` validated
    epochs in a row; holds while the gap stays above ``resolve_gap``."""
    measured = [e for e in epochs if finite(e.train_acc) and finite(e.val_acc)]
    if not measured or measured[-1] is not epochs[-1]:
        return None
    last = measured[-1]
    gap = last.train_acc - last.val_acc
    points = f"train acc {pct(last.train_acc)} - val acc {pct(last.val_acc)} = {gap * 100:.3g} points"
    recent = measured[-s.gap_patience:]
    if len(recent) == s.gap_patience and all(_significant_gap(e, s) for e in recent):
        z = _z(last)
        noise = f", {z:.3g} standard errors on {last.val_count:,} val predictions" if z is not None else ""
        return FIRING, (f"Overfitting: {points} > {s.acc_gap * 100:.3g} points in {s.gap_patience} epochs in a row"
                        f"{noise}; train error {pct(1 - last.train_acc)} vs val error {pct(1 - last.val_acc)}"), \
            gap, s.acc_gap
    if gap > s.resolve_gap:
        return HOLDING, f"Overfitting, not yet cleared: {points} > {s.resolve_gap * 100:.3g} points", gap, s.resolve_gap
    return CLEAR, f"{points} <= {s.resolve_gap * 100:.3g} points", gap, s.resolve_gap


def overfitting(obs: Observation, s: hs.OverfittingSettings) -> list[Finding] | None:
    """Default, in priority order: val loss rose 3 epochs in a row by > 5 % in total while train
    loss < val loss; else train acc − val acc > 10 points, beyond 3 standard errors of the two
    set sizes, three validated epochs in a row, with train error <= half the val error. Epochs
    without a val loss are skipped, so with validation every k epochs ``patience`` counts rounds.
    Clear only when both tests are (the resolve message then states both)."""
    if not obs.epochs:
        return None
    validated = [e for e in obs.epochs if finite(e.val_loss)]
    verdicts = [v for v in (_rising_val_loss(validated, s), _accuracy_gap(obs.epochs, s)) if v is not None]
    if not verdicts:
        return None
    fix = "Consider early stopping, more data or augmentation, weight decay or dropout."
    status, what, value, threshold = min(verdicts, key=lambda v: ORDER[v[0]])
    if status == CLEAR:
        what = "; ".join(v[1] for v in verdicts)
    return [finding(obs, s, "overfitting", what, fix, value, threshold, status=status)]


def underfitting(obs: Observation, s: hs.UnderfittingSettings) -> list[Finding] | None:
    """Default: train and val loss both > 0.5 in each of the last 10 epochs, neither improved on
    its best by more than 1 % in those 10 epochs, and accuracy (val, else train) < 0.70.

    Without validation only train loss is judged; without accuracy (regression) the accuracy
    condition is dropped and the losses decide alone (the message says so). Needs 11 epochs.
    """
    p, cmp, rule = s.patience, Compare.ABOVE, "underfitting"
    series = {"train": [e.train_loss for e in obs.epochs], "val": [e.val_loss for e in obs.epochs]}
    series = {k: v for k, v in series.items() if len(v) > p and all(finite(x) for x in v[-p - 1:])}
    if "train" not in series:
        return None
    fix = "Consider a larger model, a higher learning rate, longer training, or checking labels and inputs."
    losses = " and ".join(f"{k} loss {fmt(v[-1])}" for k, v in series.items())
    last = obs.epochs[-1]
    acc = last.val_acc if finite(last.val_acc) else last.train_acc
    cleared = None
    for name, values in series.items():
        if not all(cmp.holds(v, s.loss_threshold) for v in values[-p:]):
            cleared = f"{name} loss {fmt(min(values[-p:]))} <= {fmt(s.loss_threshold)} within the last {p} epochs"
        elif epochs_since_best([v for v in values if finite(v)], s.min_delta)[0] < p:
            cleared = f"{name} loss improved by more than {pct(s.min_delta)} within the last {p} epochs"
        if cleared is not None:
            break
    if cleared is None and finite(acc) and not Compare.BELOW.holds(acc, s.max_acc):
        cleared = f"accuracy {pct(acc)} >= {pct(s.max_acc)}"
    if cleared is not None:
        return [finding(obs, s, rule, cleared, fix, series["train"][-1], s.loss_threshold, status=CLEAR)]
    accuracy = (
        f"while accuracy {pct(acc)} < {pct(s.max_acc)}" if finite(acc)
        else "(no accuracy logged: judged on loss alone; raise health.underfitting.loss_threshold "
        "for larger-scale losses)"
    )
    what = (f"Underfitting: {losses} {cmp.symbol} {fmt(s.loss_threshold)} with no improvement over "
            f"{pct(s.min_delta)} for {p} epochs {accuracy}")
    return [finding(obs, s, rule, what, fix, series["train"][-1], s.loss_threshold)]


def plateau(obs: Observation, s: hs.PlateauSettings) -> list[Finding] | None:
    """Default: val loss (train loss without validation) not improved by more than 0.1 % of its
    best for 5 epochs that have that loss, train loss not improved either, at a constant learning
    rate, and train loss still above 10 % of the first epoch's (a run that cut it tenfold has
    converged: a flat loss is where it was meant to end)."""
    name = "val" if any(finite(e.val_loss) for e in obs.epochs) else "train"
    values = [v for e in obs.epochs if finite(v := getattr(e, f"{name}_loss"))]
    train = [e.train_loss for e in obs.epochs if finite(e.train_loss)]
    if len(values) <= s.patience:
        return None
    (wait, best), cmp, p = epochs_since_best(values, s.min_delta), Compare.AT_LEAST, s.patience
    rates = {e.lr for e in obs.epochs[-p - 1:] if e.lr is not None}
    fix = "Consider lowering the learning rate (ReduceLROnPlateau) or stopping early."
    cleared = None
    if not cmp.holds(wait, p):
        cleared = f"{name} loss improved by more than {pct(s.min_delta)} within the last {p} epochs"
    elif name == "val" and len(train) > p and epochs_since_best(train, s.min_delta)[0] < p:
        cleared = f"train loss still improving by more than {pct(s.min_delta)} within the last {p} epochs"
    elif len(rates) > 1:
        cleared = f"the learning rate changed within the last {p} epochs (a schedule is at work)"
    elif train and train[-1] < s.converged_fraction * train[0]:
        cleared = (f"converged: train loss {fmt(train[-1])} < {fmt(s.converged_fraction)} × the first epoch's "
                   f"{fmt(train[0])}")
    if cleared is not None:
        return [finding(obs, s, "plateau", cleared, fix, float(wait), float(p), status=CLEAR)]
    also = ", nor train loss," if name == "val" and len(train) > p else ""
    rate = f" at a constant learning rate {fmt(rates.pop())}" if rates else ""
    what = (f"{name.capitalize()} loss plateaued: no improvement over {pct(s.min_delta)} of best "
            f"{fmt(best)} for {wait} epochs {cmp.symbol} {p}{also}{rate}")
    return [finding(obs, s, "plateau", what, fix, float(wait), float(p))]

"""Health rules: pure functions from an :class:`Observation` to :class:`Finding` s.

No I/O and no torch here: the engine can be tested on literal histories and reused by anything
that can fill an ``Observation`` (the Monitor, a DDP gather on rank 0, a replay of old logs).

Each rule returns ``None`` when the observation lacks its inputs (it was *not checked* this
round: open alerts of that rule stay open), or a list of findings (possibly empty: checked and
healthy, so open alerts of that rule resolve). The comparison a rule makes and the symbol its
message prints come from one table, :class:`Compare`, so a message shows exactly what was compared.

Severities: ``critical`` for ``divergence`` (the run is wasted from here on) and ``memory`` (the
next allocation may kill the process); ``warning`` for all others (the run may still recover).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from statistics import median

from tbhealth.health import settings as hs
from tbhealth.health.ids import RuleId, severity_of
from tbhealth.health.settings import HealthConfig, RuleSettings


class Compare(Enum):
    """How a value is compared with its threshold; the symbol printed is the operator applied."""

    ABOVE = (">", operator.gt)
    BELOW = ("<", operator.lt)
    AT_LEAST = (">=", operator.ge)

    def holds(self, value: float, threshold: float) -> bool:
        return self.value[1](value, threshold)

    @property
    def symbol(self) -> str:
        return self.value[0]


_NEXT = {"warn": "Training continues", "pause": "Pausing training", "stop": "Stopping training"}


@dataclass(frozen=True)
class EpochMetrics:
    """One finished epoch. Accuracies are fractions 0–1; ``None`` where not measured."""

    epoch: int
    train_loss: float | None = None
    val_loss: float | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    lr: float | None = None


@dataclass(frozen=True)
class Observation:
    """Everything the rules see in one evaluation round; ``None`` means "not measured this round".

    ``step_losses`` and ``grad_norm_history`` are recent logged values, oldest first, the current
    one last (``grad_norm_history`` excludes the current ``global_grad_norm``). ``initial_loss`` is
    the first finite logged step loss. ``rank`` is set when several DDP ranks report: findings of
    rank r name it. Times are seconds (``time.time()``); memory is bytes.
    """

    epoch: int = 0
    step: int = 0
    now: float = 0.0
    state: str = "training"
    epochs: Sequence[EpochMetrics] = ()
    step_losses: Sequence[tuple[int, float]] = ()
    initial_loss: float | None = None
    nonfinite: str | None = None
    layer_grad_norms: Mapping[str, float] | None = None
    global_grad_norm: float | None = None
    grad_norm_history: Sequence[float] = ()
    dead_fraction: Mapping[str, float] | None = None
    zero_fraction: Mapping[str, float] | None = None
    gpu_memory_used: int | None = None
    gpu_memory_total: int | None = None
    last_progress_time: float | None = None
    rank: int | None = None


def episode_key(rule: str, layer: str | None = None, rank: int | None = None) -> str:
    """Identity of an alert episode: one per rule, per layer for layer rules, per rank under DDP."""
    return rule + (f":{layer}" if layer is not None else "") + (f"@{rank}" if rank is not None else "")


@dataclass(frozen=True)
class Finding:
    """One rule firing now. ``value`` and ``threshold`` are what the message compared."""

    rule: str
    severity: str
    message: str
    value: float | None
    threshold: float | None
    layer: str | None = None
    action: str = "warn"
    rank: int | None = None
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", episode_key(self.rule, self.layer, self.rank))


def fmt(x: float | None) -> str:
    """Three significant digits, scientific for tiny/huge values: '45.2', '3.2e-09', 'nan'."""
    if x is None:
        return "n/a"
    return f"{x:.3g}"


def pct(x: float) -> str:
    """A fraction as a percentage with three significant digits: 0.62 -> '62%', 0.505 -> '50.5%'."""
    return f"{x * 100:.3g}%"


def _finding(
    obs: Observation, s: RuleSettings, rule: str, what: str, fix: str, value, threshold, layer=None
) -> Finding:
    """Message = what was compared. The fix. What happens next (the configured action)."""
    prefix = f"[rank {obs.rank}] " if obs.rank is not None else ""
    nxt = f"{_NEXT[s.action]} (health.{rule}.action: {s.action})."
    message = f"{prefix}{what}. {fix} {nxt}"
    return Finding(rule, severity_of(rule), message, value, threshold, layer, s.action, obs.rank)


def _epochs_since_best(values: Sequence[float], min_delta: float) -> tuple[int, float]:
    """Epochs since the last meaningful improvement (a drop by more than min_delta × |best|), and
    the best value as counted (a smaller value that was not a meaningful gain is not the best)."""
    best, wait = values[0], 0
    for v in values[1:]:
        if v < best - min_delta * abs(best):
            best, wait = v, 0
        else:
            wait += 1
    return wait, best


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# ------------------------------------------------------------------------------------- rules


def divergence(obs: Observation, s: hs.DivergenceSettings) -> list[Finding] | None:
    """Default: latest loss > 10 × initial loss, or NaN/Inf in loss (or gradients).

    The loss judged is the latest logged step loss, else the latest epoch's train loss; a NaN/Inf
    val loss counts too. The ratio test needs a positive initial loss (losses that start <= 0,
    e.g. log-likelihoods, skip it).
    """
    latest = obs.epochs[-1] if obs.epochs else None
    loss, what = (latest.train_loss, "train loss") if latest is not None else (None, "loss")
    if obs.step_losses:
        loss, what = obs.step_losses[-1][1], f"step {obs.step_losses[-1][0]} loss"
    val = latest.val_loss if latest is not None else None
    if loss is None and val is None and obs.nonfinite is None:
        return None
    fix = "Consider lowering the learning rate, gradient clipping, or checking inputs for NaN."
    bad = None
    if obs.nonfinite == "loss" or (obs.nonfinite is not None and s.nonfinite_gradients):
        bad = obs.nonfinite
    elif loss is not None and not math.isfinite(loss):
        bad = what
    elif val is not None and not math.isfinite(val):
        bad = "val loss"
    if bad is not None:
        return [_finding(obs, s, "divergence", f"Training diverged: non-finite (NaN/Inf) {bad}", fix, None, None)]
    init = obs.initial_loss
    if loss is None or not _finite(init) or init <= 0:
        return []
    limit, cmp = s.factor * init, Compare.ABOVE
    if not cmp.holds(loss, limit):
        return []
    what = f"Loss diverged: {what} {fmt(loss)} {cmp.symbol} {fmt(s.factor)} × initial loss {fmt(init)} ({fmt(limit)})"
    return [_finding(obs, s, "divergence", what, fix, loss, limit)]


def memory(obs: Observation, s: hs.MemorySettings) -> list[Finding] | None:
    """Default: used GPU memory > 95 % of the device total (used as the driver reports it)."""
    if not obs.gpu_memory_total or obs.gpu_memory_used is None:
        return None
    frac, cmp = obs.gpu_memory_used / obs.gpu_memory_total, Compare.ABOVE
    if not cmp.holds(frac, s.max_fraction):
        return []
    gib = 2**30
    what = (
        f"GPU memory nearly full: {obs.gpu_memory_used / gib:.1f} of {obs.gpu_memory_total / gib:.1f} GiB used "
        f"({pct(frac)} {cmp.symbol} {pct(s.max_fraction)})"
    )
    fix = "Consider a smaller batch, mixed precision, activation checkpointing, or freeing cached tensors."
    return [_finding(obs, s, "memory", what, fix, frac, s.max_fraction)]


def exploding_gradients(obs: Observation, s: hs.ExplodingGradientsSettings) -> list[Finding] | None:
    """Default: global grad norm > 1e3, or > 10 × median of the last 20 sampled norms (≥ 5 needed)."""
    norm = obs.global_grad_norm
    if norm is None:
        return None
    if not math.isfinite(norm):
        return []  # NaN/Inf gradients are divergence's finding, not a size
    cmp, fix = Compare.ABOVE, "Consider gradient clipping (torch.nn.utils.clip_grad_norm_) or a lower learning rate."
    if cmp.holds(norm, s.max_norm):
        what = f"Exploding gradients: global grad norm {fmt(norm)} {cmp.symbol} {fmt(s.max_norm)}"
        return [_finding(obs, s, "exploding_gradients", what, fix, norm, s.max_norm)]
    recent = [g for g in obs.grad_norm_history[-s.window :] if _finite(g)]
    if s.ratio is None or len(recent) < s.min_history or median(recent) <= 0:
        return []
    limit = s.ratio * median(recent)
    if not cmp.holds(norm, limit):
        return []
    what = (
        f"Exploding gradients: global grad norm {fmt(norm)} {cmp.symbol} {fmt(s.ratio)} × recent median "
        f"{fmt(median(recent))} ({fmt(limit)})"
    )
    return [_finding(obs, s, "exploding_gradients", what, fix, norm, limit)]


def _per_layer(obs: Observation, s, rule: str, values: Mapping[str, float] | None, cmp: Compare,
               threshold: float, fix: str, describe: Callable[[str, float, str], str]) -> list[Finding] | None:
    """One finding per layer whose value passes ``cmp`` against ``threshold``; None: not measured."""
    if values is None:
        return None
    return [_finding(obs, s, rule, describe(layer, v, cmp.symbol), fix, v, threshold, layer)
            for layer, v in values.items() if _finite(v) and cmp.holds(v, threshold)]


def vanishing_gradients(obs: Observation, s: hs.VanishingGradientsSettings) -> list[Finding] | None:
    """Default: a layer's grad norm < 1e-7. Per layer: the first layers of a deep net vanish while
    the global norm, dominated by the last layers, looks healthy."""
    fix = "Consider ReLU/residual connections, normalisation or a different initialisation."
    return _per_layer(obs, s, "vanishing_gradients", obs.layer_grad_norms, Compare.BELOW, s.min_norm, fix,
                      lambda layer, norm, sym: f"Layer '{layer}' has vanishing gradients: grad norm "
                                               f"{fmt(norm)} {sym} {fmt(s.min_norm)}")


def dead_neurons(obs: Observation, s: hs.DeadNeuronsSettings) -> list[Finding] | None:
    """Default: > 50 % of an activation layer's units output exactly 0 for every sampled input."""
    fix = "Consider a lower learning rate, LeakyReLU/GELU, or a different initialisation or bias."
    return _per_layer(obs, s, "dead_neurons", obs.dead_fraction, Compare.ABOVE, s.max_fraction, fix,
                      lambda layer, frac, sym: f"Layer '{layer}' has dead units: {pct(frac)} output 0 for "
                                               f"every sampled input {sym} {pct(s.max_fraction)}")


def loss_spike(obs: Observation, s: hs.LossSpikeSettings) -> list[Finding] | None:
    """Default: latest logged step loss > 5 × median of the 20 before it (≥ 5 needed; positive median)."""
    if not obs.step_losses:
        return None
    step, loss = obs.step_losses[-1]
    recent = [v for _, v in obs.step_losses[:-1][-s.window :] if _finite(v)]
    if not _finite(loss) or len(recent) < s.min_history or median(recent) <= 0:
        return []
    limit, cmp = s.factor * median(recent), Compare.ABOVE
    if not cmp.holds(loss, limit):
        return []
    what = (
        f"Loss spike: step {step} loss {fmt(loss)} {cmp.symbol} {fmt(s.factor)} × recent median "
        f"{fmt(median(recent))} ({fmt(limit)})"
    )
    fix = "Consider a lower learning rate, warmup, gradient clipping, or checking that batch for bad data."
    return [_finding(obs, s, "loss_spike", what, fix, loss, limit)]


def overfitting(obs: Observation, s: hs.OverfittingSettings) -> list[Finding] | None:
    """Default, in priority order: val loss rose 3 epochs in a row while train loss < val loss;
    else train acc - val acc > 0.10 (fractions: ten points). Epochs without a val loss are
    skipped, so with validation every k epochs ``patience`` counts validation rounds."""
    if not obs.epochs:
        return None
    fix = "Consider early stopping, more data or augmentation, weight decay or dropout."
    validated = [e for e in obs.epochs if _finite(e.val_loss)]
    val = [e.val_loss for e in validated]
    rises = 0
    while rises + 1 < len(val) and val[-1 - rises] > val[-2 - rises]:
        rises += 1
    cmp = Compare.AT_LEAST
    if rises and cmp.holds(rises, s.patience):
        last = validated[-1]
        if _finite(last.train_loss) and last.train_loss < last.val_loss:
            trail = " -> ".join(fmt(v) for v in val[-rises - 1 :])
            what = (
                f"Overfitting: val loss rose {rises} epochs in a row {cmp.symbol} {s.patience} ({trail}) "
                f"while train loss {fmt(last.train_loss)} < val loss {fmt(last.val_loss)}"
            )
            return [_finding(obs, s, "overfitting", what, fix, float(rises), float(s.patience))]
    last = obs.epochs[-1]
    if _finite(last.train_acc) and _finite(last.val_acc):
        gap, cmp = last.train_acc - last.val_acc, Compare.ABOVE
        if cmp.holds(gap, s.acc_gap):
            what = (
                f"Overfitting: train acc {pct(last.train_acc)} - val acc {pct(last.val_acc)} = "
                f"{gap * 100:.3g} points {cmp.symbol} {s.acc_gap * 100:.3g} points"
            )
            return [_finding(obs, s, "overfitting", what, fix, gap, s.acc_gap)]
    return []


def underfitting(obs: Observation, s: hs.UnderfittingSettings) -> list[Finding] | None:
    """Default: train and val loss both > 0.5 in each of the last 10 epochs, neither improved on
    its best by more than 1 % in those 10 epochs, and accuracy (val, else train) < 0.70.

    Without validation only train loss is judged; without accuracy (regression) the accuracy
    condition is dropped and the losses decide alone (the message says so).
    """
    if not obs.epochs:
        return None
    p, cmp = s.patience, Compare.ABOVE
    series = {"train": [e.train_loss for e in obs.epochs], "val": [e.val_loss for e in obs.epochs]}
    series = {k: v for k, v in series.items() if len(v) > p and all(_finite(x) for x in v[-p - 1 :])}
    if "train" not in series:
        return []
    for values in series.values():
        if not all(cmp.holds(v, s.loss_threshold) for v in values[-p:]):
            return []
        if _epochs_since_best([v for v in values if _finite(v)], s.min_delta)[0] < p:
            return []
    last = obs.epochs[-1]
    acc = last.val_acc if _finite(last.val_acc) else last.train_acc
    if _finite(acc) and not Compare.BELOW.holds(acc, s.max_acc):
        return []
    losses = " and ".join(f"{k} loss {fmt(v[-1])}" for k, v in series.items())
    accuracy = (
        f"while accuracy {pct(acc)} < {pct(s.max_acc)}"
        if _finite(acc)
        else "(no accuracy logged: judged on loss alone; raise health.underfitting.loss_threshold "
        "for larger-scale losses)"
    )
    what = (
        f"Underfitting: {losses} {cmp.symbol} {fmt(s.loss_threshold)} with no improvement over "
        f"{pct(s.min_delta)} for {p} epochs {accuracy}"
    )
    fix = "Consider a larger model, a higher learning rate, longer training, or checking labels and inputs."
    return [_finding(obs, s, "underfitting", what, fix, series["train"][-1], s.loss_threshold)]


def plateau(obs: Observation, s: hs.PlateauSettings) -> list[Finding] | None:
    """Default: val loss (train loss without validation) not improved by more than 0.1 % of its
    best for 5 epochs that have that loss (validation rounds when validating every k epochs)."""
    if not obs.epochs:
        return None
    name = "val" if any(_finite(e.val_loss) for e in obs.epochs) else "train"
    values = [v for e in obs.epochs if _finite(v := getattr(e, f"{name}_loss"))]
    if not values:
        return []
    (wait, best), cmp = _epochs_since_best(values, s.min_delta), Compare.AT_LEAST
    if not cmp.holds(wait, s.patience):
        return []
    what = (
        f"{name.capitalize()} loss plateaued: no improvement over {pct(s.min_delta)} of best "
        f"{fmt(best)} for {wait} epochs {cmp.symbol} {s.patience}"
    )
    fix = "Consider lowering the learning rate (ReduceLROnPlateau) or stopping early."
    return [_finding(obs, s, "plateau", what, fix, float(wait), float(s.patience))]


def stalled(obs: Observation, s: hs.StalledSettings) -> list[Finding] | None:
    """Default: state is ``training`` but no train/val batch finished for 300 s."""
    if obs.last_progress_time is None:
        return None
    idle, cmp = obs.now - obs.last_progress_time, Compare.ABOVE
    if obs.state != "training" or not cmp.holds(idle, s.timeout_s):
        return []
    what = f"Training stalled: no progress for {idle:.0f} s {cmp.symbol} {s.timeout_s:.0f} s (last step {obs.step})"
    fix = "Check the data loader, a hung distributed collective, or slow storage."
    return [_finding(obs, s, "stalled", what, fix, idle, s.timeout_s)]


#: Rule id -> rule function, in priority order (the order of ``RuleId``).
RULES: dict[str, Callable[[Observation, RuleSettings], list[Finding] | None]] = {
    RuleId.DIVERGENCE.value: divergence,
    RuleId.MEMORY.value: memory,
    RuleId.EXPLODING_GRADIENTS.value: exploding_gradients,
    RuleId.VANISHING_GRADIENTS.value: vanishing_gradients,
    RuleId.DEAD_NEURONS.value: dead_neurons,
    RuleId.LOSS_SPIKE.value: loss_spike,
    RuleId.OVERFITTING.value: overfitting,
    RuleId.UNDERFITTING.value: underfitting,
    RuleId.PLATEAU.value: plateau,
    RuleId.STALLED.value: stalled,
}
if tuple(RULES) != tuple(r.value for r in RuleId):  # pragma: no cover - a rule added to one table only
    raise ImportError("tbhealth.health.rules.RULES is out of step with RuleId")


def check(obs: Observation, cfg: HealthConfig) -> tuple[list[Finding], set[str]]:
    """Run every enabled rule in priority order; returns the findings and the ids of rules checked."""
    findings: list[Finding] = []
    checked: set[str] = set()
    if not cfg.enabled:
        return findings, checked
    for rule_id, rule in RULES.items():
        settings = cfg.rule(rule_id)
        if not settings.enabled:
            continue
        result = rule(obs, settings)
        if result is not None:
            checked.add(rule_id)
            findings.extend(result)
    return findings, checked


def check_all(observations: Sequence[Observation], cfg: HealthConfig) -> tuple[list[Finding], set[str]]:
    """One round over several ranks' observations (DDP, on rank 0): pass the result to a single
    ``AlertTracker.update``. Updating once per rank would resolve the other ranks' alerts."""
    findings: list[Finding] = []
    checked: set[str] = set()
    for obs in observations:
        f, c = check(obs, cfg)
        findings += f
        checked |= c
    return findings, checked


def evaluate(obs: Observation, cfg: HealthConfig) -> list[Finding]:
    """The findings of one round (see :func:`check` for which rules were checked as well)."""
    return check(obs, cfg)[0]

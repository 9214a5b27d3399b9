"""What the rules read (:class:`Observation`) and what they say (:class:`Finding`), plus the small
helpers every rule shares. Pure: no I/O, no torch.

A rule returns ``None`` when the observation lacks its inputs (*not checked*: open alerts of that
rule stay open), else a list of findings, each in one of three states:

* ``firing``: the condition holds now; a new episode may begin;
* ``holding``: the condition no longer holds but has not *clearly* cleared (the value sits between
  the firing threshold and the resolve threshold): an open episode stays open, none begins;
* ``clear``: the condition has clearly cleared; the message says so with the current value, and
  becomes the resolved alert's message (it never prints the firing condition as true).

This hysteresis is what keeps a value hovering around a threshold from opening and closing an
alert every round.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from tbhealth.health.ids import severity_of
from tbhealth.health.settings import RuleSettings

FIRING, HOLDING, CLEAR = "firing", "holding", "clear"
#: Per-layer findings list at most this many layers in their message (all of them in ``layers``).
MAX_NAMED_LAYERS = 5


class Compare(Enum):
    """How a value is compared with its threshold; the symbol printed is the operator applied."""

    ABOVE = (">", operator.gt)
    BELOW = ("<", operator.lt)
    AT_LEAST = (">=", operator.ge)
    AT_MOST = ("<=", operator.le)

    def holds(self, value: float, threshold: float) -> bool:
        return self.value[1](value, threshold)

    @property
    def symbol(self) -> str:
        return self.value[0]

    @property
    def negation(self) -> "Compare":
        """The comparison that holds exactly when this one does not (printed in clear messages)."""
        return _NEGATION[self]


_NEGATION = {Compare.ABOVE: Compare.AT_MOST, Compare.AT_MOST: Compare.ABOVE,
             Compare.BELOW: Compare.AT_LEAST, Compare.AT_LEAST: Compare.BELOW}
_NEXT = {"warn": "Training continues", "pause": "Pausing training", "stop": "Stopping training"}


@dataclass(frozen=True)
class EpochMetrics:
    """One finished epoch. Accuracies are fractions 0–1; ``None`` where not measured.

    ``train_count``/``val_count`` are how many predictions each accuracy was measured over
    (samples, or tokens for sequence targets): they tell how much of an accuracy gap is noise.
    """

    epoch: int
    train_loss: float | None = None
    val_loss: float | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    lr: float | None = None
    train_count: int | None = None
    val_count: int | None = None


@dataclass(frozen=True)
class Observation:
    """Everything the rules see in one evaluation round; ``None`` means "not measured this round".

    Step-level values summarise the whole logging window that ends at ``step`` (every step of it,
    aggregated on the device), not one sampled step:

    * ``step_losses``: one entry per window, oldest first, the current one last: ``(last step of
      the window, largest loss of the window)``; ``window_start`` is the current window's first step;
    * ``nonfinite``: ``"loss"`` if any step's loss in the window was NaN/Inf, ``"gradients"`` if a
      measured gradient was; ``None`` if all were finite;
    * ``global_grad_norm``: the largest gradient norm known in the window (the pre-clip norm the
      loop reported each step, else the sampled one); ``grad_norm_history`` the earlier windows'.

    ``initial_loss`` is the run's first step loss, ``initial_grad_norm`` its first measured norm.
    ``layer_grad_norms``/``dead_fraction``/``zero_fraction`` come from sampled steps.
    ``stack`` is the training thread's Python stack (for ``stalled``). ``rank`` is set when several
    DDP ranks report: findings of rank r name it. Times are seconds (``time.time()``); memory is bytes.
    """

    epoch: int = 0
    step: int = 0
    now: float = 0.0
    state: str = "training"
    epochs: Sequence[EpochMetrics] = ()
    step_losses: Sequence[tuple[int, float]] = ()
    window_start: int | None = None
    initial_loss: float | None = None
    nonfinite: str | None = None
    layer_grad_norms: Mapping[str, float] | None = None
    global_grad_norm: float | None = None
    grad_norm_history: Sequence[float] = ()
    initial_grad_norm: float | None = None
    dead_fraction: Mapping[str, float] | None = None
    zero_fraction: Mapping[str, float] | None = None
    gpu_memory_used: int | None = None
    gpu_memory_total: int | None = None
    last_progress_time: float | None = None
    stack: str | None = None
    rank: int | None = None


def episode_key(rule: str, layer: str | None = None, rank: int | None = None) -> str:
    """Identity of an alert episode: one per rule (per rank under DDP). A per-layer rule's episode
    covers all its layers (one root cause, one alert), so ``layer`` is not part of the key; it is
    accepted for callers that still pass it."""
    return rule + (f"@{rank}" if rank is not None else "")


@dataclass(frozen=True)
class Finding:
    """One rule's verdict this round. ``value`` and ``threshold`` are what the message compared.

    ``status`` is ``firing``, ``holding`` or ``clear`` (see the module docstring). A per-layer
    rule lists every affected layer in ``layers`` as ``(layer, value)`` worst first; ``layer`` is
    the worst one. ``stack`` is a Python stack attached to the alert (``stalled``).
    """

    rule: str
    severity: str
    message: str
    value: float | None
    threshold: float | None
    layer: str | None = None
    action: str = "warn"
    rank: int | None = None
    key: str = field(default="")
    status: str = FIRING
    layers: tuple[tuple[str, float], ...] = ()
    stack: str | None = None

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", episode_key(self.rule, None, self.rank))

    @property
    def firing(self) -> bool:
        return self.status == FIRING


class Checked(set):
    """The ids of the rules evaluated in a round (a set), and per episode key the message saying
    why that episode is clear now (``cleared``): the message of the alert when it resolves."""

    def __init__(self, ids=(), cleared: Mapping[str, str] | None = None) -> None:
        super().__init__(ids)
        self.cleared: dict[str, str] = dict(cleared or {})

    def merge(self, other: "Checked | set") -> None:
        self |= other
        self.cleared.update(getattr(other, "cleared", {}))


def fmt(x: float | None) -> str:
    """Three significant digits, scientific for tiny/huge values: '45.2', '3.2e-09', 'nan'."""
    if x is None:
        return "n/a"
    return f"{x:.3g}"


def pct(x: float) -> str:
    """A fraction as a percentage with three significant digits: 0.62 -> '62%', 0.505 -> '50.5%'."""
    return f"{x * 100:.3g}%"


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def finding(obs: Observation, s: RuleSettings, rule: str, what: str, fix: str, value, threshold, *,
            status: str = FIRING, layers: tuple[tuple[str, float], ...] = (), stack: str | None = None
            ) -> Finding:
    """Message = what was compared. The fix. What happens next (the configured action).

    A clear finding says what was compared and that the alert resolves: no fix, no action.
    """
    prefix = f"[rank {obs.rank}] " if obs.rank is not None else ""
    if status == CLEAR:
        message = f"{prefix}Resolved: {what}."
    elif status == HOLDING:
        message = f"{prefix}{what}. {fix} The alert stays open until it clearly clears."
    else:
        message = f"{prefix}{what}. {fix} {_NEXT[s.action]} (health.{rule}.action: {s.action})."
    layer = layers[0][0] if layers else None
    return Finding(rule, severity_of(rule), message, value, threshold, layer, s.action, obs.rank,
                   status=status, layers=layers, stack=stack)


def banded(obs: Observation, s: RuleSettings, rule: str, value: float, cmp: Compare, fire: float,
           release: float, *, title: str, subject: str, bound=fmt, fix: str, **extra) -> Finding:
    """The usual three-way verdict of one value against a firing and a resolve threshold.

    Fires when ``value cmp fire``, holds while ``value cmp release``, else is clear. Messages read
    ``title: subject > bound(fire)`` (firing), ``title, not yet cleared: subject <= bound(fire) but
    > bound(release)`` (holding) and ``Resolved: subject <= bound(release)`` (clear).
    """
    neg = cmp.negation.symbol
    if cmp.holds(value, fire):
        return finding(obs, s, rule, f"{title}: {subject} {cmp.symbol} {bound(fire)}", fix, value, fire, **extra)
    if cmp.holds(value, release):
        what = f"{title}, not yet cleared: {subject} {neg} {bound(fire)} but {cmp.symbol} {bound(release)}"
        return finding(obs, s, rule, what, fix, value, fire, status=HOLDING, **extra)
    return finding(obs, s, rule, f"{subject} {neg} {bound(release)}", fix, value, release, status=CLEAR, **extra)


def epochs_since_best(values: Sequence[float], min_delta: float) -> tuple[int, float]:
    """Epochs since the last meaningful improvement (a drop by more than min_delta × |best|), and
    the best value as counted (a smaller value that was not a meaningful gain is not the best)."""
    best, wait = values[0], 0
    for v in values[1:]:
        if v < best - min_delta * abs(best):
            best, wait = v, 0
        else:
            wait += 1
    return wait, best


def named_layers(layers: Sequence[tuple[str, float]], unit=fmt) -> str:
    """'net.2 4e-08, net.4 9e-08 and 3 more': the layers after the worst, for a message."""
    shown = ", ".join(f"{name} {unit(v)}" for name, v in layers[:MAX_NAMED_LAYERS])
    more = len(layers) - MAX_NAMED_LAYERS
    return shown + (f" and {more} more" if more > 0 else "")

"""Health settings: the ``health:`` section of the config, one sub-model per rule id.

Every threshold here is the documented default of a rule in :mod:`tbhealth.health.rules`; the
meaning of each number lives next to it so that the README, ``--help`` and error messages can
all be generated from one place. Units are in the field descriptions; two are easy to get wrong:

* accuracies and ``acc_gap`` are **fractions 0–1** (0.10 is ten points), never percent;
* ``patience`` counts **finished epochs** (validation rounds), not steps.

Every threshold that opens an alert has a ``resolve_*`` partner on the healthy side of it: an open
alert resolves only once its value has crossed that one (hysteresis), so a value hovering around
the threshold does not open and close an alert every round. Equal values mean no hysteresis.

Bad values fail when the config is built, with a message that names the key and what is
allowed (pydantic's ``loc`` gives the dotted path, e.g. ``health.divergence.factor``).

Default actions are all ``warn``: an unattended job that pauses waits for a human forever, and
stopping on a false alarm loses work, so escalation to ``pause``/``stop`` is the user's choice.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from tbhealth.health.ids import RULE_IDS

Action = Literal["warn", "pause", "stop"]
ACTIONS: tuple[str, ...] = ("warn", "pause", "stop")


def _fraction(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be a fraction in (0, 1], got {value}; write 0.1 for 10 %, not 10")
    return value


#: A share of something (accuracy, units, memory) as a fraction: 0.10 is ten percent.
Fraction = Annotated[float, AfterValidator(_fraction)]


class _Strict(BaseModel):
    """Unknown keys fail and the error lists the keys that exist (a typo is named, not ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                allowed = ", ".join(cls.model_fields)
                raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
        return data


class RuleSettings(_Strict):
    """What every rule has: whether it runs and what happens when it fires."""

    #: (firing threshold, resolve threshold, "above"|"below", default): the rule fires when its
    #: value is above (below) the first; the second must then be at most (at least) the first.
    #: A resolve threshold left null is ``default(firing threshold)``, so that a user who moves
    #: the firing threshold gets a matching resolve threshold without setting both.
    _bands: ClassVar[tuple[tuple[str, str, str, Any], ...]] = ()

    enabled: bool = Field(True, description="Evaluate this rule (false: never fires).")
    action: Action = Field(
        "warn", description="On firing: warn (record an alert), pause (wait for resume) or stop (checkpoint and end)."
    )

    @model_validator(mode="after")
    def _resolve_on_the_healthy_side(self) -> "RuleSettings":
        for fire, release, side, default in self._bands:
            a, b = getattr(self, fire), getattr(self, release)
            if a is not None and b is None:
                object.__setattr__(self, release, default(a))  # no re-validation: derived, not given
            elif a is not None and (b > a if side == "above" else b < a):
                word = "at most" if side == "above" else "at least"
                raise ValueError(f"{release} ({b}) must be {word} {fire} ({a}): an alert resolves on the healthy side")
        return self


class DivergenceSettings(RuleSettings):
    """Loss far above where it started, or NaN/Inf anywhere in loss or gradients. Severity critical."""

    _bands = (("factor", "resolve_factor", "above", lambda v: max(v / 2, 1.0)),)

    factor: float = Field(
        10.0, gt=1.0, description="Fires when the largest step loss of a logging window > factor × initial loss (ratio)."
    )
    resolve_factor: float | None = Field(
        None, gt=0.0, description="An open alert resolves once that loss <= this × initial loss (ratio, <= factor; "
        "null: factor / 2, so 5)."
    )
    nonfinite_gradients: bool = Field(
        True,
        description="Also fire on NaN/Inf gradients (off under fp16 AMP: its GradScaler skips such steps by design).",
    )


class OverfittingSettings(RuleSettings):
    """Validation diverging from training. Severity warning."""

    _bands = (("acc_gap", "resolve_gap", "above", lambda v: v / 2),)

    patience: int = Field(3, ge=1, description="Fires when val loss rose this many epochs in a row (epochs)...")
    min_rise: float = Field(
        0.05, ge=0.0, description="...by more than this fraction of where the rise began, in total (relative; "
        "smaller rises are validation noise). Resolves once val loss is back within it of its best.",
    )
    acc_gap: Fraction = Field(
        0.10, description="Or when train acc − val acc > this gap (fraction 0–1; 0.10 = 10 points)...")
    min_z: float = Field(
        3.0, ge=0.0, description="...and the gap is more than this many standard errors of a difference of two "
        "accuracies measured on sets of these sizes (z-score; skipped when the sizes are unknown)...",
    )
    gap_patience: int = Field(
        3, ge=1, description="...in this many validated epochs in a row (epochs; one noisy epoch is not a trend)...")
    max_error_ratio: Fraction = Field(
        0.5, description="...and the model fits its training data: train error (1 − train acc) at most this "
        "fraction of val error (ratio; a model at chance has nothing to overfit).",
    )
    resolve_gap: Fraction | None = Field(
        None, description="An open gap alert resolves once train acc − val acc <= this (fraction 0–1, <= acc_gap; "
        "null: acc_gap / 2, so 0.05).")


class UnderfittingSettings(RuleSettings):
    """Model not learning: losses stuck high. Severity warning.

    Without accuracy (regression) the rule judges on losses alone; ``loss_threshold`` is then on the
    scale of your loss, so raise it for targets on a large scale.
    """

    loss_threshold: float = Field(0.5, description="Train and val loss must both stay above this (loss units).")
    patience: int = Field(10, ge=1, description="…with no meaningful improvement for this many epochs (epochs).")
    min_delta: float = Field(
        0.01, ge=0.0, lt=1.0, description="A gain below this fraction of the best loss is not meaningful (relative)."
    )
    max_acc: Fraction = Field(0.70, description="…while accuracy is below this (fraction 0–1).")


class PlateauSettings(RuleSettings):
    """Validation loss stopped improving (train loss when there is no validation). Severity warning.

    Off by default: a flat loss alone cannot tell a run stuck early from one that converged and
    is simply trained long (most runs end flat), so on by default it would fire on healthy runs.
    A loss stuck high is ``underfitting``'s finding; turn this on for a nudge to stop or decay.
    """

    enabled: bool = Field(False, description="Evaluate this rule (default false: see the rule's description).")

    patience: int = Field(
        5, ge=1, description="Fires after this many epochs in which neither val nor train loss improved, at "
        "a constant learning rate (epochs; a schedule that changes the LR is already handling plateaus)...",
    )
    min_delta: float = Field(
        0.001, ge=0.0, lt=1.0, description="A gain below this fraction of the best loss does not count (relative)."
    )
    converged_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="...unless train loss is already below this fraction of the first epoch's "
        "(relative): a run that cut its loss tenfold has converged, and a flat loss is its expected end state.",
    )


class DeadNeuronsSettings(RuleSettings):
    """Units of an activation layer that output exactly 0 for every sampled input. Severity warning."""

    _bands = (("max_fraction", "resolve_fraction", "above", lambda v: round(max(v - 0.1, v / 2), 6)),)

    max_fraction: Fraction = Field(
        0.5, description="Fires when more than this fraction of a layer's units are dead (fraction 0–1)."
    )
    resolve_fraction: Fraction | None = Field(
        None, description="An open alert resolves once every layer is at or below this (fraction 0–1, <= max_fraction;"
        " null: max_fraction − 0.1, so 0.4)."
    )


class VanishingGradientsSettings(RuleSettings):
    """A layer's gradient too small to move its weights; checked per layer. Severity warning."""

    _bands = (("min_norm", "resolve_norm", "below", lambda v: v * 10),)

    min_norm: float = Field(
        1e-7, gt=0.0, description="Fires when a layer's gradient L2 norm < this, exactly 0 excepted (gradient units).")
    resolve_norm: float | None = Field(
        None, gt=0.0, description="An open alert resolves once every layer's norm >= this (gradient units, "
        ">= min_norm; null: 10 × min_norm, so 1e-6)."
    )


class ExplodingGradientsSettings(RuleSettings):
    """Global gradient norm far too large, absolutely or relative to its own recent median. Severity warning."""

    _bands = (("max_norm", "resolve_norm", "above", lambda v: v / 2),
              ("ratio", "resolve_ratio", "above", lambda v: max(v / 2, 1.0)))

    max_norm: float = Field(
        1e3, gt=0.0, description="Fires when the largest global gradient L2 norm of a window > this (gradient units).")
    resolve_norm: float | None = Field(
        None, gt=0.0, description="An open alert resolves once the norm <= this (gradient units, <= max_norm; "
        "null: max_norm / 2)...")
    ratio: float | None = Field(
        10.0, gt=1.0, description="Or when it is > ratio × median of recent windows' norms (ratio; null disables)...")
    resolve_ratio: float | None = Field(
        None, gt=0.0, description="...and <= this × that median (ratio, <= ratio; null: ratio / 2).")
    min_vs_initial: float = Field(
        1.0, ge=0.0, description="The ratio test also needs the norm > this × the run's first measured norm (ratio): "
        "a quiet run's tiny norms growing tenfold is not an explosion.",
    )
    window: int = Field(20, ge=2, description="How many recent windows' norms the median is taken over (windows).")
    min_history: int = Field(5, ge=1, description="The ratio test waits for this many earlier windows (windows).")


class LossSpikeSettings(RuleSettings):
    """One logged step loss far above the recent typical loss. Severity warning."""

    _bands = (("factor", "resolve_factor", "above", lambda v: max(v / 2, 1.0)),)

    factor: float = Field(
        5.0, gt=1.0, description="Fires when a window's largest step loss > factor × median of earlier windows' (ratio)...")
    resolve_factor: float | None = Field(
        None, gt=0.0, description="An open alert resolves once <= this × that median (ratio; null: factor / 2).")
    min_vs_initial: float = Field(
        0.1, ge=0.0, description="...and > this × the initial loss (ratio): jumps among near-zero losses are noise.")
    window: int = Field(20, ge=2, description="How many earlier windows the median covers (logging windows).")
    min_history: int = Field(5, ge=1, description="Waits for this many earlier windows (logging windows).")


class MemorySettings(RuleSettings):
    """GPU memory nearly exhausted: the next allocation may be out-of-memory. Severity critical."""

    _bands = (("max_fraction", "resolve_fraction", "above", lambda v: round(max(v - 0.05, v / 2), 6)),)

    max_fraction: Fraction = Field(
        0.95, description="Fires when used GPU memory > this fraction of the device total (fraction 0–1)."
    )
    resolve_fraction: Fraction | None = Field(
        None, description="An open alert resolves once used memory <= this fraction (fraction 0–1, <= max_fraction; "
        "null: max_fraction − 0.05, so 0.90)."
    )


class StalledSettings(RuleSettings):
    """A run that says it is training but makes no step progress. Severity warning."""

    timeout_s: float = Field(300.0, gt=0.0, description="Fires after this long without a train or val batch (seconds).")
    all_threads: bool = Field(
        False, description="Put every thread's Python stack in the alert and the log, not only the training thread's.")


class HealthConfig(_Strict):
    """The ``health:`` section: sampling cadence plus one block per rule id.

    ``every_steps`` = 50: a sampled step pays for activation hooks, per-layer gradient norms and
    one device->host read. Measured on CPU (1 thread, 512-wide 3-layer MLP, batch 64): a 1.9 ms
    step costs 0.5-0.7 ms more when sampled, so sampling every 50th step adds about 0.5-0.7 %
    on average (every 10th: ~3.5 %). On a GPU the extra is a few dozen tiny kernel launches,
    smaller still. Epoch-level rules (overfitting, underfitting, plateau) need no sampling.
    """

    enabled: bool = Field(True, description="Run the health engine at all (false: no instruments, no alerts).")
    every_steps: int = Field(50, ge=1, description="Sample activations and gradients every this many steps (steps).")
    dense_steps: int = Field(
        10, ge=0, description="Observe each of the run's first this many steps: read the loss back and sample "
        "activations and gradients every step (steps; a bad initialisation shows within a few steps).",
    )
    activation_modules: list[str] = Field(
        default_factory=list,
        description="Extra module names or class names whose output is an activation (e.g. a custom fused block).",
    )
    divergence: DivergenceSettings = Field(default_factory=DivergenceSettings, description="See rule divergence.")
    overfitting: OverfittingSettings = Field(default_factory=OverfittingSettings, description="See rule overfitting.")
    underfitting: UnderfittingSettings = Field(
        default_factory=UnderfittingSettings, description="See rule underfitting."
    )
    plateau: PlateauSettings = Field(default_factory=PlateauSettings, description="See rule plateau.")
    dead_neurons: DeadNeuronsSettings = Field(default_factory=DeadNeuronsSettings, description="See rule dead_neurons.")
    vanishing_gradients: VanishingGradientsSettings = Field(
        default_factory=VanishingGradientsSettings, description="See rule vanishing_gradients."
    )
    exploding_gradients: ExplodingGradientsSettings = Field(
        default_factory=ExplodingGradientsSettings, description="See rule exploding_gradients."
    )
    loss_spike: LossSpikeSettings = Field(default_factory=LossSpikeSettings, description="See rule loss_spike.")
    memory: MemorySettings = Field(default_factory=MemorySettings, description="See rule memory.")
    stalled: StalledSettings = Field(default_factory=StalledSettings, description="See rule stalled.")

    def rule(self, rule_id: str) -> RuleSettings:
        """Settings of one rule by id; an unknown id names the ids that exist."""
        if rule_id not in RULE_IDS:
            raise KeyError(f"unknown health rule {rule_id!r}; allowed: {', '.join(RULE_IDS)}")
        return getattr(self, rule_id)

    def history_len(self) -> int:
        """How many recent step losses / grad norms a caller must keep for the windowed rules."""
        return max(self.loss_spike.window, self.exploding_gradients.window) + 1

"""Health settings: the ``health:`` section of the config, one sub-model per rule id.

Every threshold here is the documented default of a rule in :mod:`tbhealth.health.rules`; the
meaning of each number lives next to it so that the README, ``--help`` and error messages can
all be generated from one place. Units are in the field descriptions; two are easy to get wrong:

* accuracies and ``acc_gap`` are **fractions 0–1** (0.10 is ten points), never percent;
* ``patience`` counts **finished epochs** (validation rounds), not steps.

Bad values fail when the config is built, with a message that names the key and what is
allowed (pydantic's ``loc`` gives the dotted path, e.g. ``health.divergence.factor``).

Default actions are all ``warn``: an unattended job that pauses waits for a human forever, and
stopping on a false alarm loses work, so escalation to ``pause``/``stop`` is the user's choice.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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

    enabled: bool = Field(True, description="Evaluate this rule (false: never fires).")
    action: Action = Field(
        "warn", description="On firing: warn (record an alert), pause (wait for resume) or stop (checkpoint and end)."
    )


class DivergenceSettings(RuleSettings):
    """Loss far above where it started, or NaN/Inf anywhere in loss or gradients. Severity critical."""

    factor: float = Field(10.0, gt=1.0, description="Fires when loss > factor × initial loss (ratio, > 1).")
    nonfinite_gradients: bool = Field(
        True,
        description="Also fire on NaN/Inf gradients (off under fp16 AMP: its GradScaler skips such steps by design).",
    )


class OverfittingSettings(RuleSettings):
    """Validation diverging from training. Severity warning."""

    patience: int = Field(3, ge=1, description="Fires when val loss rose this many epochs in a row (epochs).")
    acc_gap: Fraction = Field(
        0.10, description="Or when train acc − val acc > this gap (fraction 0–1; 0.10 = 10 points)."
    )


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
    """Validation loss stopped improving (train loss when there is no validation). Severity warning."""

    patience: int = Field(5, ge=1, description="Fires after this many epochs without improvement (epochs).")
    min_delta: float = Field(
        0.001, ge=0.0, lt=1.0, description="A gain below this fraction of the best loss does not count (relative)."
    )


class DeadNeuronsSettings(RuleSettings):
    """Units of an activation layer that output exactly 0 for every sampled input. Severity warning."""

    max_fraction: Fraction = Field(
        0.5, description="Fires when more than this fraction of a layer's units are dead (fraction 0–1)."
    )


class VanishingGradientsSettings(RuleSettings):
    """A layer's gradient too small to move its weights; checked per layer. Severity warning."""

    min_norm: float = Field(1e-7, gt=0.0, description="Fires when a layer's gradient L2 norm < this (gradient units).")


class ExplodingGradientsSettings(RuleSettings):
    """Global gradient norm far too large, absolutely or relative to its own recent median. Severity warning."""

    max_norm: float = Field(1e3, gt=0.0, description="Fires when the global gradient L2 norm > this (gradient units).")
    ratio: float | None = Field(
        10.0, gt=1.0, description="Or when it is > ratio × median of recent sampled norms (ratio; null disables)."
    )
    window: int = Field(20, ge=2, description="How many recent sampled norms the median is taken over (samples).")
    min_history: int = Field(5, ge=1, description="The ratio test waits for this many earlier samples (samples).")


class LossSpikeSettings(RuleSettings):
    """One logged step loss far above the recent typical loss. Severity warning."""

    factor: float = Field(5.0, gt=1.0, description="Fires when a step loss > factor × median of recent ones (ratio).")
    window: int = Field(20, ge=2, description="How many recent logged step losses the median covers (logged steps).")
    min_history: int = Field(5, ge=1, description="Waits for this many earlier logged losses (logged steps).")


class MemorySettings(RuleSettings):
    """GPU memory nearly exhausted: the next allocation may be out-of-memory. Severity critical."""

    max_fraction: Fraction = Field(
        0.95, description="Fires when used GPU memory > this fraction of the device total (fraction 0–1)."
    )


class StalledSettings(RuleSettings):
    """A run that says it is training but makes no step progress. Severity warning."""

    timeout_s: float = Field(300.0, gt=0.0, description="Fires after this long without a train or val batch (seconds).")


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

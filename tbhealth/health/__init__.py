"""The health engine: pure rules and the alert lifecycle. No I/O, no torch.

``ids`` names the rules, ``settings`` holds their thresholds and actions (the config's
``health:`` section), ``rules`` turns an :class:`Observation` into findings, and ``alerts``
turns successive rounds of findings into alert episodes. The torch side that measures a model
lives in :mod:`tbhealth.instruments`. Names are imported on first use (PEP 562), so reading
``tbhealth.health.ids`` costs no pydantic import.
"""

from __future__ import annotations

from tbhealth._lazy import lazy_attributes

_LAZY = {
    "RuleId": ".ids", "RULE_IDS": ".ids", "SEVERITIES": ".ids", "severity_of": ".ids",
    "ACTIONS": ".settings", "Action": ".settings", "HealthConfig": ".settings", "RuleSettings": ".settings",
    "RULES": ".rules", "Checked": ".rules", "Compare": ".rules", "EpochMetrics": ".rules", "Finding": ".rules", "Observation": ".rules",
    "check": ".rules", "check_all": ".rules", "episode_key": ".rules", "evaluate": ".rules",
    "AlertEvent": ".alerts", "AlertTracker": ".alerts", "health_score": ".alerts",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return __all__

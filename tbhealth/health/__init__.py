"""The health engine: pure rules and alert lifecycle, plus torch instruments that feed them.

``rules``, ``alerts`` and ``settings`` import no torch; ``Instruments`` (torch) is imported
lazily on first use, so config validation and the CLI stay light.
"""

from __future__ import annotations

from typing import Any

from tbhealth.health.alerts import AlertTracker, health_score
from tbhealth.health.rules import (
    RULES,
    SEVERITY,
    Compare,
    EpochMetrics,
    Finding,
    Observation,
    check,
    check_all,
    episode_key,
    evaluate,
)
from tbhealth.health.settings import ACTIONS, RULE_IDS, Action, HealthConfig, RuleSettings

__all__ = [
    "ACTIONS",
    "RULES",
    "RULE_IDS",
    "SEVERITY",
    "Action",
    "AlertTracker",
    "Compare",
    "EpochMetrics",
    "Finding",
    "HealthConfig",
    "Instruments",
    "Observation",
    "RuleSettings",
    "check",
    "check_all",
    "episode_key",
    "evaluate",
    "health_score",
]


def __getattr__(name: str) -> Any:
    if name == "Instruments":
        from tbhealth.health.instruments import Instruments

        return Instruments
    raise AttributeError(f"module 'tbhealth.health' has no attribute {name!r}")

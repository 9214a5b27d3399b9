"""Rule ids and severities: public names (config keys, alert records, docs), spelled once.

A rule's id is a contract with users (``health.<rule id>`` in their configs, ``rule`` in
``alerts --json``); it is declared here, never derived from a function's name.
"""

from __future__ import annotations

from enum import Enum


class RuleId(str, Enum):
    """Every health rule, in the priority order the engine evaluates and reports them."""

    DIVERGENCE = "divergence"
    MEMORY = "memory"
    EXPLODING_GRADIENTS = "exploding_gradients"
    VANISHING_GRADIENTS = "vanishing_gradients"
    DEAD_NEURONS = "dead_neurons"
    LOSS_SPIKE = "loss_spike"
    OVERFITTING = "overfitting"
    UNDERFITTING = "underfitting"
    PLATEAU = "plateau"
    STALLED = "stalled"


RULE_IDS: tuple[str, ...] = tuple(r.value for r in RuleId)

#: Alert severities, mildest first.
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
#: ``critical`` where the run is wasted from here on (divergence) or the next allocation may kill
#: the process (memory); ``warning`` where it may still recover.
CRITICAL_RULES = frozenset({RuleId.DIVERGENCE.value, RuleId.MEMORY.value})


def severity_of(rule: str) -> str:
    return "critical" if rule in CRITICAL_RULES else "warning"


__all__ = ["RuleId", "RULE_IDS", "SEVERITIES", "CRITICAL_RULES", "severity_of"]

"""Health settings: the ``health:`` section of the config (thresholds and action per rule).

PLACEHOLDER SHAPE — the health-engine work replaces this with one model per rule.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Action = Literal["warn", "pause", "stop"]


class RuleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    action: Action = "warn"


class HealthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every_steps: int = 10

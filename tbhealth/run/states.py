"""The run states of DESIGN.md and what a reader makes of them, defined once.

The trainer writes one of :data:`STATES`; readers (the CLI, the Health tab) add
:data:`UNRESPONSIVE` when a live run's heartbeat is stale. The tab gets these lists from the
plugin's ``GET config``, so Python is the only place they are spelled.
"""

from __future__ import annotations

import time
from enum import Enum


class State(str, Enum):
    """A run's state as its trainer reports it (``str`` values: they are the JSON)."""

    STARTING = "starting"
    TRAINING = "training"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"  # by a user, a signal or a health rule
    COMPLETED = "completed"
    FAILED = "failed"


STATES: tuple[str, ...] = tuple(s.value for s in State)
#: A run in one of these can act on a control request.
LIVE_STATES: frozenset[str] = frozenset({State.STARTING.value, State.TRAINING.value, State.PAUSED.value})
#: A run in one of these never changes again (until ``--resume`` starts a new incarnation).
FINAL_STATES: frozenset[str] = frozenset({State.STOPPED.value, State.COMPLETED.value, State.FAILED.value})
#: What readers report for a non-final run whose heartbeat is stale.
UNRESPONSIVE = "unresponsive"
#: States a reader can report.
READ_STATES: tuple[str, ...] = (*STATES, UNRESPONSIVE)
#: A live run rewrites its status at least every second (paused too); after this long without a
#: heartbeat, readers report it ``unresponsive`` (a ``kill -9``, a hung node, a lost filesystem).
STALE_AFTER_S = 10.0

#: Control commands a run accepts.
COMMANDS: tuple[str, ...] = ("pause", "resume", "stop", "checkpoint")
#: Why a run in a state that is not live cannot act on a request (readers say it to the user).
NOT_LIVE_WHY: dict[str, str] = {
    State.COMPLETED.value: "it finished",
    State.STOPPED.value: "it was stopped",
    State.FAILED.value: "it failed",
    State.STOPPING.value: "it is already stopping",
    UNRESPONSIVE: "its heartbeat is stale: the trainer was killed or hangs",
}
#: ... and for a run with no readable status at all.
NO_STATUS_WHY = "it has no heartbeat yet"


def is_live(state: str) -> bool:
    """Whether a run in ``state`` can act on a control request."""
    return state in LIVE_STATES


def effective_state(status: dict, now: float | None = None) -> str:
    """The state a reader reports: the trainer's, or ``unresponsive`` when its heartbeat is stale."""
    state = status.get("state", State.STARTING.value)
    if state in FINAL_STATES:
        return state
    updated = status.get("updated_at")
    now = time.time() if now is None else now
    if not isinstance(updated, (int, float)) or now - updated > STALE_AFTER_S:
        return UNRESPONSIVE
    return state


__all__ = [
    "State", "STATES", "LIVE_STATES", "FINAL_STATES", "UNRESPONSIVE", "READ_STATES", "STALE_AFTER_S",
    "COMMANDS", "NOT_LIVE_WHY", "NO_STATUS_WHY", "is_live", "effective_state",
]

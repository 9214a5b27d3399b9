"""A run's progress as the training thread records it and the heartbeat reads it.

The training thread only assigns plain attributes (a few ns each); the heartbeat thread turns
them into the status document (:func:`tbhealth.run.status.build_status`) about once a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tbhealth.run.states import State


@dataclass
class Progress:
    """Mutable run progress, written by the training thread, read by the heartbeat."""

    run: str
    total_epochs: int
    state: str = State.STARTING.value
    epoch: int = 0  # the epoch being trained, 1-based; 0 before the first
    epochs_done: int = 0
    batch: int = 0
    batches_per_epoch: int | None = None
    global_step: int = 0
    started_at: float = field(default_factory=time.time)
    elapsed_before: float = 0.0  # active seconds of earlier incarnations (resume)
    active_start: float = field(default_factory=time.monotonic)
    paused_s: float = 0.0  # paused seconds in this incarnation
    paused_since: float | None = None
    epoch_start: float = field(default_factory=time.monotonic)
    epoch_paused_s: float = 0.0
    epoch_durations: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # per finished epoch: METRIC_KEYS
    interventions: dict = field(default_factory=lambda: {"pauses": 0, "resumes": 0, "stops": 0, "checkpoints": 0})
    warnings: int = 0
    errors: int = 0
    last_step_time: float = field(default_factory=time.time)
    world_size: int = 1
    message: str | None = None

    def active_seconds(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        paused = self.paused_s + (now - self.paused_since if self.paused_since is not None else 0.0)
        return self.elapsed_before + (now - self.active_start) - paused

    def epoch_active_seconds(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        paused = self.epoch_paused_s + (now - self.paused_since if self.paused_since is not None else 0.0)
        return max(0.0, now - self.epoch_start - paused)

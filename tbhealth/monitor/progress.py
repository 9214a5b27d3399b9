"""A run's progress as the training thread records it and the heartbeat reads it.

The training thread only assigns plain attributes (a few ns each); the heartbeat thread turns
them into the status document (:func:`tbhealth.run.status.build_status`) about once a second.
Everything the status says about the run comes from here, so there is one place to look.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

from tbhealth.run.states import State


@dataclass
class Progress:
    """Mutable run progress, written by the training thread, read by the heartbeat."""

    run: str
    total_epochs: int | None  # planned epochs; None: the run is planned in steps (``total_steps``)
    total_steps: int | None = None  # planned optimizer steps; None: planned in epochs
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
    message: str | None = None  # why the run failed or stopped, one line
    run_dir: str = ""  # absolute path of the run directory
    device: str | None = None  # where the model's parameters live ("cpu", "cuda:0"); None: no model
    last_checkpoint: str | None = None  # file name of the last checkpoint written
    ranks: list[dict] = field(default_factory=list)  # DDP: each rank's loss at the last logging step
    resume_hint: str | None = None  # how this run continues after a stop, in the loop's own terms
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)

    def active_seconds(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        paused = self.paused_s + (now - self.paused_since if self.paused_since is not None else 0.0)
        return self.elapsed_before + (now - self.active_start) - paused

    def epoch_active_seconds(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        paused = self.epoch_paused_s + (now - self.paused_since if self.paused_since is not None else 0.0)
        return max(0.0, now - self.epoch_start - paused)

    def more_planned(self, epochs_done: int) -> bool:
        """Whether an epoch after ``epochs_done`` is planned: neither end reached (none set: always)."""
        return ((self.total_epochs is None or epochs_done < self.total_epochs)
                and (self.total_steps is None or self.global_step < self.total_steps))

    def begin_epoch(self, epoch: int, batches: int | None, batch: int = 0) -> None:
        """Epoch ``epoch`` starts (``batch`` of its batches already done, after a resume)."""
        self.epoch, self.batches_per_epoch, self.batch = epoch, batches, batch
        self.epoch_start, self.epoch_paused_s = time.monotonic(), 0.0

    def finish_epoch(self, metrics: dict) -> float:
        """The epoch in progress ended with ``metrics``; returns its active (unpaused) seconds."""
        seconds = self.epoch_active_seconds()
        self.epoch_durations.append(seconds)
        self.history.append({"epoch": self.epoch, **metrics})
        self.epochs_done = self.epoch
        self.last_step_time = time.time()
        return seconds

    # -- what a checkpoint keeps -------------------------------------------------------------

    def state_dict(self) -> dict:
        """Which run (``run_dir``), where it is (``epochs_done``, ``epoch`` in progress, ``batch``
        done in it, ``global_step``) and what it did so far, for a resumed run to continue from."""
        return {
            "run_dir": self.run_dir, "epochs_done": self.epochs_done, "epoch": self.epoch, "batch": self.batch,
            "global_step": self.global_step, "elapsed_s": self.active_seconds(), "started_at": self.started_at,
            "history": list(self.history), "epoch_durations": list(self.epoch_durations),
            "interventions": dict(self.interventions), "warnings": self.warnings, "errors": self.errors,
        }

    def load_state_dict(self, s: dict, batch: int | None = None) -> None:
        """Continue from :meth:`state_dict`; ``batch`` overrides the saved position in the epoch."""
        self.epochs_done, self.global_step = s["epochs_done"], s["global_step"]
        self.epoch = s.get("epoch", s["epochs_done"])
        self.batch = (s.get("batch", 0) if batch is None else batch) if self.epoch > self.epochs_done else 0
        self.elapsed_before, self.started_at = s.get("elapsed_s", 0.0), s.get("started_at", self.started_at)
        self.history, self.epoch_durations = list(s.get("history", [])), list(s.get("epoch_durations", []))
        self.interventions.update(s.get("interventions", {}))
        self.warnings, self.errors = s.get("warnings", 0), s.get("errors", 0)

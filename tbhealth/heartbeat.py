"""The heartbeat: what a run reports about itself, and the thread that writes it.

The training thread only assigns plain attributes of :class:`Progress` (a few ns each); the
heartbeat thread turns them into the status JSON of DESIGN.md about once a second, at once when
poked (state changes), and while paused. Nothing here runs on the training thread's hot path.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

METRIC_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


@dataclass
class Progress:
    """Mutable run progress, written by the training thread, read by the heartbeat."""

    run: str
    total_epochs: int
    state: str = "starting"
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


def estimate_eta(
    epoch_durations: list[float], epochs_done: int, total_epochs: int,
    epoch_elapsed: float, batch: int, batches: int | None,
) -> float | None:
    """Seconds left: the mean finished-epoch time for the epochs left, less the current one's part.

    Before any epoch has finished, the current epoch's pace (seconds per batch) stands in.
    None when there is nothing to go on yet.
    """
    remaining_epochs = total_epochs - epochs_done
    if remaining_epochs <= 0:
        return 0.0
    if epoch_durations:
        per_epoch = sum(epoch_durations[-10:]) / len(epoch_durations[-10:])
    elif batch > 0 and batches:
        per_epoch = epoch_elapsed / batch * batches
    else:
        return None
    if batches:
        done_fraction = min(batch / batches, 1.0)
        in_epoch_left = per_epoch * (1 - done_fraction)
    else:
        in_epoch_left = max(per_epoch - epoch_elapsed, 0.0)
    return max(0.0, in_epoch_left + per_epoch * (remaining_epochs - 1))


def metrics_with_deltas(history: list[dict]) -> dict[str, dict | None]:
    """Latest value of each epoch metric and its change from the previous epoch."""
    out: dict[str, dict | None] = {}
    for key in METRIC_KEYS:
        values = [h[key] for h in history if h.get(key) is not None]
        if not values:
            out[key] = None
            continue
        delta = values[-1] - values[-2] if len(values) > 1 else None
        out[key] = {"value": values[-1], "delta": delta}
    return out


def build_status(p: Progress, *, system: dict | None, alerts_active: int, health_score: int,
                 extra: dict | None = None, now: float | None = None) -> dict[str, Any]:
    """The status JSON of DESIGN.md (``updated_at`` is added by the writer)."""
    now_m = time.monotonic() if now is None else now
    eta = None
    if p.state in ("training", "paused", "starting"):
        in_epoch = p.epoch > p.epochs_done  # between two epochs, none of the next one is done yet
        eta = estimate_eta(p.epoch_durations, p.epochs_done, p.total_epochs,
                           p.epoch_active_seconds(now_m) if in_epoch else 0.0, p.batch if in_epoch else 0,
                           p.batches_per_epoch)
    elif p.state == "completed":
        eta = 0.0
    status = {
        "run": p.run,
        "state": p.state,
        "epoch": p.epoch,
        "total_epochs": p.total_epochs,
        "epochs_done": p.epochs_done,
        "batch": p.batch,
        "batches_per_epoch": p.batches_per_epoch,
        "global_step": p.global_step,
        "started_at": p.started_at,
        "elapsed_s": round(p.active_seconds(now_m), 3),
        "eta_s": None if eta is None else round(eta, 1),
        "last_step_at": p.last_step_time,
        "metrics": metrics_with_deltas(p.history),
        "system": system,
        "alerts_active": alerts_active,
        "health_score": health_score,
        "interventions": dict(p.interventions),
        "log_counts": {"warnings": p.warnings, "errors": p.errors},
        "world_size": p.world_size,
        "message": p.message,
    }
    if extra:
        status.update(extra)
    return status


class Heartbeat:
    """Calls ``write()`` every ``interval`` seconds and whenever poked, on a daemon thread."""

    def __init__(self, write: Callable[[], None], interval: float = 1.0):
        self._write = write
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tbhealth-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._write()
            except Exception:  # a full disk must not kill training; the next beat retries
                pass

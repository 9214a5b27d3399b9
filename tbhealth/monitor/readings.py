"""What the training thread reads back from the device, and when: the only host syncs of a step.

Two kinds of steps read anything. A *logging* step (every ``log_every``) reads the step loss,
the aggregates of every step since the last logging step (:class:`StepWindow`: largest loss, any
NaN/Inf, largest reported gradient norm) and the gradient norm in ONE transfer, gathers them from
every rank under DDP, and records ``step/*`` scalars and the loss rules. A *sampled* step (every
``health.every_steps``) reads the health instruments (one more transfer) for the layer rules.
Each of the first ``health.dense_steps`` steps is both. Rank 0 judges: it holds every rank's
readings, and its alerts are the run's.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from tbhealth.distributed import DistContext
from tbhealth.health.alerts import AlertEvent
from tbhealth.instruments.window import StepWindow
from tbhealth.monitor.epoch_sums import EpochSums
from tbhealth.monitor.progress import Progress
from tbhealth.monitor.sinks import Sink

if TYPE_CHECKING:
    from tbhealth.instruments.watch import HealthWatch


class Readings:
    """The read-backs of one process; ``judge`` is the HealthWatch that decides (rank 0) or None."""

    def __init__(self, progress: Progress, sums: EpochSums, sink: Sink, *, model: torch.nn.Module | None,
                 health: HealthWatch | None, judge: HealthWatch | None, dist: DistContext | None,
                 record: Callable[[list[AlertEvent]], None], window: StepWindow | None = None,
                 note: Callable[[str], None] | None = None):
        self._p, self._sums, self._sink, self._model = progress, sums, sink, model
        self._health, self._judge, self._dist, self._record = health, judge, dist, record
        self._window, self._note = window, note
        self._rank = dist.rank if dist is not None else None  # findings name the rank only under DDP
        self.last_loss: float | None = None  # mean over ranks at the last logging step (terminal)

    def log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, extra: dict | None = None, *,
                 closes: bool = True) -> None:
        """The logging step: one transfer to the host for everything read this step: the step's
        loss, the window's aggregates (every step since the last logging step) and the norm;
        ``extra`` scalars (``step/lr``) go out in the same event. ``closes``: the window ends here
        (a regular logging step); one of the densely observed first steps looks into the window
        without ending it."""
        p = self._p
        self._sums.fold()  # bounds the epoch's list, and hands every step's loss since to the window
        if grad_norm is None and self._model is not None:
            grads = [q.grad for q in self._model.parameters() if q.grad is not None]
            if grads:
                grad_norm = torch.nn.utils.get_total_norm(grads)
        step = p.global_step
        window = self._window
        start, window = (window.take(step) if closes else window.peek(step)) if window is not None else (None, None)
        parts = [loss.float().reshape(1)] + ([window.to(loss.device)] if window is not None else [])
        if grad_norm is not None:
            parts.append(grad_norm.detach().float().reshape(1).to(loss.device))
        values = torch.cat(parts).tolist()  # the sync
        now_norm = values[-1] if grad_norm is not None else None
        mine = (self._rank, values[0], start, *_window_values(values, window is not None, now_norm))
        readings = self._gather(mine)
        p.last_step_time = time.time()
        finite = [r[1] for r in readings if math.isfinite(r[1])]
        self.last_loss = sum(finite) / len(finite) if finite else float("nan")
        if self._dist is not None:
            p.ranks = [{"rank": r[0], "step": p.global_step, "loss": r[1]} for r in readings]
        if self._judge is not None:
            self._record(self._judge.on_log_step(epoch=p.epoch, step=p.global_step, readings=readings, closes=closes))
        scalars = {"step/loss": self.last_loss, **(extra or {})}
        if now_norm is not None:
            scalars["step/grad_norm"] = now_norm
        self._sink.scalars(p.global_step, scalars)

    def close_window(self) -> None:
        """Judge the steps since the last logging step now (an epoch's end, already a sync point):
        the last window of an epoch, or of a run, is never left unjudged."""
        self._sums.fold()  # hands the window the epoch's last losses
        if self._window is None or self._window.empty:
            return
        start, window = self._window.take(self._p.global_step)
        largest, bad, reported = window.tolist()  # the sync
        readings = self._gather((self._rank, float("nan"), start, largest, bool(bad), None if reported < 0 else reported))
        if self._judge is not None:
            self._record(self._judge.on_log_step(epoch=self._p.epoch, step=self._p.global_step, readings=readings))

    def sample(self, reported: torch.Tensor | None = None) -> None:
        """A sampled step just finished: read the instruments, judge the layer rules.
        ``reported``: the step's gradient norm as the loop gave it (pre-clip), read alongside."""
        p = self._p
        samples = self._gather((self._rank, self._health.read_sample(reported)))
        if self._judge is not None:
            coverage = samples[0][1].pop("coverage", None)
            if coverage and self._note is not None:
                self._note(coverage)  # once per run: what the instruments can and cannot see
            scalars, events = self._judge.evaluate_sample(epoch=p.epoch, step=p.global_step, samples=samples)
            self._sink.scalars(p.global_step, scalars)
            self._record(events)

    def _gather(self, item: Any) -> list:
        return [item] if self._dist is None else self._dist.all_gather(item)


def _window_values(values: list[float], has_window: bool, now_norm: float | None) -> tuple[float, bool, float | None]:
    """(largest loss, any non-finite, largest known grad norm) from one logging step's read-back;
    without a window (health checks off) the step itself is the window."""
    if not has_window:
        return values[0], not math.isfinite(values[0]), now_norm
    largest, bad, reported = values[1:4]
    norms = [v for v in (None if reported < 0 else reported, now_norm) if v is not None]  # -1: none reported
    norm = (max(norms) if all(math.isfinite(v) for v in norms) else float("nan")) if norms else None
    return largest, bool(bad), norm

"""What the training thread reads back from the device, and when: the only host syncs of a step.

Two kinds of steps read anything. A *logging* step (every ``log_every``) reads the step loss,
the epoch's running loss sum and the gradient norm in ONE transfer, gathers them from every
rank under DDP, and records ``step/*`` scalars and the loss rules. A *sampled* step (every
``health.every_steps``) reads the health instruments (one more transfer) for the layer rules.
Rank 0 judges: it holds every rank's readings, and its alerts are the run's.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from tbhealth.distributed import DistContext
from tbhealth.health.alerts import AlertEvent
from tbhealth.monitor.epoch_sums import EpochSums
from tbhealth.monitor.progress import Progress
from tbhealth.monitor.sinks import Sink

if TYPE_CHECKING:
    from tbhealth.instruments.watch import HealthWatch


class Readings:
    """The read-backs of one process; ``judge`` is the HealthWatch that decides (rank 0) or None."""

    def __init__(self, progress: Progress, sums: EpochSums, sink: Sink, *, model: torch.nn.Module | None,
                 health: HealthWatch | None, judge: HealthWatch | None, dist: DistContext | None,
                 record: Callable[[list[AlertEvent]], None]):
        self._p, self._sums, self._sink, self._model = progress, sums, sink, model
        self._health, self._judge, self._dist, self._record = health, judge, dist, record
        self._rank = dist.rank if dist is not None else None  # findings name the rank only under DDP
        self.last_loss: float | None = None  # mean over ranks at the last logging step (terminal)

    def log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, extra: dict | None = None) -> None:
        """The logging step: one transfer to the host for everything read this step; ``extra``
        scalars (``step/lr``) go out in the same event."""
        p = self._p
        loss_sum = self._sums.fold()
        if grad_norm is None and self._model is not None:
            grads = [q.grad for q in self._model.parameters() if q.grad is not None]
            if grads:
                grad_norm = torch.nn.utils.get_total_norm(grads)
        parts = [loss.float().reshape(()), loss_sum]
        if grad_norm is not None:
            parts.append(grad_norm.detach().float().reshape(()).to(loss.device))
        values = torch.stack(parts).tolist()  # the sync
        mine = (self._rank, values[0], values[1], values[2] if len(values) > 2 else None)
        readings = self._gather(mine)
        p.last_step_time = time.time()
        finite = [r[1] for r in readings if math.isfinite(r[1])]
        self.last_loss = sum(finite) / len(finite) if finite else float("nan")
        if self._dist is not None:
            p.ranks = [{"rank": r[0], "step": p.global_step, "loss": r[1]} for r in readings]
        if self._judge is not None:
            self._record(self._judge.on_log_step(epoch=p.epoch, step=p.global_step, readings=readings))
        scalars = {"step/loss": self.last_loss, **(extra or {})}
        if mine[3] is not None:
            scalars["step/grad_norm"] = mine[3]
        self._sink.scalars(p.global_step, scalars)

    def sample(self) -> None:
        """A sampled step just finished: read the instruments, judge the layer rules."""
        p = self._p
        samples = self._gather((self._rank, self._health.read_sample()))
        if self._judge is not None:
            scalars, events = self._judge.evaluate_sample(epoch=p.epoch, step=p.global_step, samples=samples)
            self._sink.scalars(p.global_step, scalars)
            self._record(events)

    def _gather(self, item: Any) -> list:
        return [item] if self._dist is None else self._dist.all_gather(item)

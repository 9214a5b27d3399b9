"""The watchdog: what must happen on the wall clock whether or not training steps come.

Two rules need no step to be judged: ``memory`` (GPU memory near full, from the system
sampler's latest reading) and ``stalled`` (state ``training`` but no step for minutes). They
run here every ``interval`` seconds, on their own thread, and so does the ``system/*`` scalars
record every :data:`SYSTEM_SCALARS_EVERY_S`. A failing tick is reported in the run's log and
retried (see :mod:`tbhealth.monitor.periodic`); the status writer never waits on it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from tbhealth.health.alerts import AlertEvent
from tbhealth.monitor.periodic import PeriodicThread, Report
from tbhealth.monitor.progress import Progress
from tbhealth.monitor.sinks import Sink

if TYPE_CHECKING:
    from tbhealth.instruments.watch import HealthWatch
    from tbhealth.monitor.system import SystemSampler

#: ``system/*`` scalars go to TensorBoard this often (seconds).
SYSTEM_SCALARS_EVERY_S = 5.0


class Watchdog(PeriodicThread):
    """Wall-clock health rules and system scalars; ``record`` takes the alert events it finds."""

    def __init__(self, progress: Progress, sink: Sink, *, health: HealthWatch | None,
                 system: SystemSampler | None, record: Callable[[list[AlertEvent]], None],
                 interval: float = 1.0, report: Report | None = None):
        super().__init__("watchdog", self.tick, interval, report)
        self._progress, self._sink, self._record = progress, sink, record
        self._health, self._system = health, system
        self._next_scalars = 0.0

    def tick(self) -> None:
        """One round: the wall-clock rules, then the system scalars when due."""
        system = self._system.latest() if self._system is not None else None
        if self._health is not None:
            events = self._health.on_tick(self._progress, system)
            if events:
                self._record(events)
        now = time.monotonic()
        if self._system is not None and now >= self._next_scalars:
            self._next_scalars = now + SYSTEM_SCALARS_EVERY_S
            self._sink.scalars(self._progress.global_step, self._system.scalars())

"""The heartbeat: rewrites the run's status about once a second, and does nothing else.

Readers (the CLI, the Health tab) call a run ``unresponsive`` when its status is more than
10 s old, so this thread's one job is to keep that file fresh: every ``interval`` seconds, at
once when poked (a state change, an alert, the end of an epoch), and while paused. A failed
write is reported in the run's log and retried (see :mod:`tbhealth.monitor.periodic`). Health
rules that run on the wall clock live in :mod:`tbhealth.monitor.watchdog`, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tbhealth.monitor.periodic import PeriodicThread, Report
from tbhealth.monitor.progress import Progress
from tbhealth.monitor.sinks import Sink
from tbhealth.run.rundir import RunDir
from tbhealth.run.status import build_status

if TYPE_CHECKING:
    from tbhealth.instruments.watch import HealthWatch
    from tbhealth.monitor.system import SystemSampler


class Heartbeat(PeriodicThread):
    """Builds the status from the run's progress and hands it to the sink; see the module doc.

    ``start()``, ``poke()`` and ``stop()`` drive the thread; ``run_once()`` writes on the calling
    thread and reports a failure instead of raising it (the final status at close).
    """

    def __init__(self, progress: Progress, sink: Sink, run: RunDir, *, health: HealthWatch | None,
                 system: SystemSampler | None, distributed: bool, interval: float = 1.0,
                 report: Report | None = None):
        super().__init__("status writer", self.write, interval, report)
        self._progress, self._sink, self._run = progress, sink, run
        self._health, self._system, self._distributed = health, system, distributed

    def write(self) -> None:
        """Build the status now and hand it to the sink (raises what the write raises)."""
        p, health = self._progress, self._health
        failures = self._run.rank_failures() if self._distributed else []  # one stat when none
        self._sink.status(build_status(
            p, system=self._system.latest() if self._system is not None else None,
            alerts_active=health.active_count() if health is not None else 0,
            health_score=health.score(p.warnings, p.errors) if health is not None else 100,
            peer_failure=failures[0]["message"] if failures else None,
        ))

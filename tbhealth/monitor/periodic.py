"""A daemon thread that runs one job every ``interval`` seconds and at once when poked.

The monitor's heartbeat (the status) and its watchdog (the wall-clock rules) are two of these.
A job that raises must not end the thread (a full disk heals, the next period retries), and must
not fail silently either: a bug that stopped status writes would show a live run as
``unresponsive`` with nothing in its log. So the first failure of a streak is reported with its
traceback, and so is the recovery; the failures in between are counted, not repeated.
"""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Callable

#: ``report(level, message)``: where failures are told (the run's log, in the Monitor).
Report = Callable[[str, str], None]

_log = logging.getLogger("tbhealth")


class PeriodicThread:
    """Runs ``job()`` on a daemon thread every ``interval`` seconds and whenever poked."""

    def __init__(self, name: str, job: Callable[[], None], interval: float, report: Report | None = None):
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.name, self.interval = name, interval
        self._job, self._report = job, report
        self._failures = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"tbhealth-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Run the job now rather than at the end of the period (cheap: sets an event)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (after the job in progress, if any); a later ``poke`` does nothing."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run_once(self) -> bool:
        """Run the job on the calling thread; a failure is reported, never raised. True if it ran."""
        try:
            self._job()
        except Exception as e:
            self._failures += 1
            if self._failures == 1:
                self._say("ERROR", f"{self.name} failed: {type(e).__name__}: {e}; retrying every "
                                   f"{self.interval:g} s\n{traceback.format_exc()}")
            return False
        if self._failures:
            self._say("INFO", f"{self.name} works again after {self._failures} failed attempt(s)")
            self._failures = 0
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.run_once()

    def _say(self, level: str, message: str) -> None:
        if self._report is not None:
            try:
                self._report(level, message)
                return
            except Exception:  # the run's log may be on the same full disk: say it here instead
                _log.exception("tbhealth: could not record in the run's log that the %s failed", self.name)
        _log.log(logging.ERROR if level == "ERROR" else logging.INFO, "tbhealth: %s", message)

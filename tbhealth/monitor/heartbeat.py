"""The heartbeat: the thread that rewrites the run's status about once a second.

It calls one function (the monitor's status write) every ``interval`` seconds, at once when
poked (state changes) and while paused. Nothing here runs on the training thread's hot path.
"""

from __future__ import annotations

import threading
from typing import Callable


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

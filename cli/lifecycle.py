"""SIGINT and SIGTERM for the whole of ``tbhealth train``, not only while the Monitor listens.

While a run trains, the Monitor turns either signal into a stop with a checkpoint. Before it
starts (building data and model can take minutes) and after it has closed, Python's defaults
would act instead: an empty run folder with no status left behind, or exit 143 for a run that
had completed. :class:`Lifecycle` covers the whole command in three phases:

* **set-up**: the signal interrupts it (:class:`SetupInterrupted`); the command removes the run
  folder it created (a resumed run keeps its last final state) and exits 128 + the signal number;
* **training**: the Monitor's handlers sit on top of these; a signal that arrives before they are
  installed (or that a chaining handler passes on) asks the monitor to stop, as they would;
* **ended**: the run's outcome stands and the signal is ignored. When the command owns the process
  (the ``tbhealth`` script, :data:`owns_process`), SIGTERM stays ignored until it exits: a
  scheduler's clean-up signal after the end cannot turn a completed run into exit 143.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

#: Set by the ``tbhealth`` script: the process ends with the command, so a handler may outlive it.
owns_process = False

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SetupInterrupted(BaseException):
    """SIGINT/SIGTERM before training began. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` around a user's data or model factory swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} during set-up")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Lifecycle:
    """The signal handlers of one ``tbhealth train`` command; use as a context manager."""

    def __init__(self, keep_sigterm: bool = True):
        self.phase = "setup"
        self._monitor: Any = None
        self._keep_sigterm = keep_sigterm
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Lifecycle:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in _SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, old in self._old.items():
            if sig == signal.SIGTERM and self.phase == "ended" and self._keep_sigterm and owns_process:
                old = signal.SIG_IGN  # not a Python handler: the interpreter resets those as it exits
            signal.signal(sig, old)
        self._old.clear()

    def training(self, monitor: Any) -> None:
        """Set-up is over: from now on a signal is a stop request to ``monitor``."""
        self._monitor, self.phase = monitor, "training"

    def ended(self) -> None:
        self.phase = "ended"

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.phase == "setup":
            self.phase = "leaving"  # a second signal must not interrupt the clean-up
            raise SetupInterrupted(signum)
        if self.phase == "training" and self._monitor is not None:
            self._monitor.request_stop(f"received {signal.Signals(signum).name}")

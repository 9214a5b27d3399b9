"""Where a run's records go: TensorBoard scalars and text, alert records, status, log lines.

Under DDP rank 0 writes the run's files and every rank is measured, logs and obeys control.
That decision is made once, when the Monitor picks its sink: rank 0 gets a :class:`RunSink`,
every other rank the do-nothing :class:`Sink`, so the code that produces records never asks
"am I rank 0?". Log lines are the exception by design: every rank appends its own (with its
rank) to the run's log, which is how a crash on rank 3 leaves its traceback; :class:`RunLog`
keeps that apart from the sink.
"""

from __future__ import annotations

import re
import threading
import time
import traceback
from typing import TYPE_CHECKING

from tbhealth.health.alerts import AlertEvent
from tbhealth.monitor.events import EventWriter
from tbhealth.run.rundir import RunDir
from tbhealth.run.states import FINAL_STATES
from tbhealth.run.status import METRIC_TAGS

if TYPE_CHECKING:
    from tbhealth.monitor.progress import Progress
    from tbhealth.monitor.reporter import Reporter


def _charts(*keys: str) -> list[str]:
    return [f"^{re.escape(METRIC_TAGS[k])}$" for k in keys]


#: TensorBoard's Custom Scalars layout: train and val of one metric on one chart.
CUSTOM_SCALARS = {
    "Training": {
        "Loss (train vs val)": _charts("train_loss", "val_loss"),
        "Accuracy (train vs val)": _charts("train_acc", "val_acc"),
        "Learning rate": _charts("lr"),
    },
    "Steps": {"Step loss": ["^step/loss$"], "Gradient norm": ["^step/grad_norm$"], "Learning rate": ["^step/lr$"]},
}


class Sink:
    """The records of one run. This base drops everything: the sink of every rank but 0."""

    def open(self, health_settings: dict) -> None:
        """Start writing; ``health_settings`` are the run's resolved ``health:`` thresholds."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars of one step, as one event."""

    def text(self, step: int, tag: str, markdown: str) -> None:
        """A TensorBoard text record (the Text dashboard)."""

    def alert(self, record: dict) -> None:
        """An alert event (fired, updated or resolved) for the run's alerts file."""

    def status(self, doc: dict) -> None:
        """A new status snapshot."""

    def close(self, step: int, state: str) -> None:
        """The run ended in ``state``: say so and flush everything."""


class RunSink(Sink):
    """Rank 0's sink: the run's TensorBoard event file and its run-state files."""

    def __init__(self, run: RunDir):
        self._run = run
        self._writer: EventWriter | None = None  # opened by open(): no file before start()
        self._status_lock = threading.Lock()  # the heartbeat thread and close() both write
        self._final_written = False

    def open(self, health_settings: dict) -> None:
        self._run.state_dir.mkdir(parents=True, exist_ok=True)
        self._run.write_health_settings(health_settings)
        self._writer = EventWriter(self._run.path, flush_secs=1.0)
        self._writer.custom_scalars(CUSTOM_SCALARS)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None and values:
            self._writer.scalars(step, values)

    def text(self, step: int, tag: str, markdown: str) -> None:
        if self._writer is not None:
            self._writer.text(step, tag, markdown)

    def alert(self, record: dict) -> None:
        self._run.append_alert(record)

    def status(self, doc: dict) -> None:
        with self._status_lock:
            if self._final_written:  # a late heartbeat must not turn "completed" back into "training"
                return
            self._run.write_status(doc)
            self._final_written = doc["state"] in FINAL_STATES

    def close(self, step: int, state: str) -> None:
        if self._writer is not None:
            self._writer.text(step, "run/state", f"Run finished: **{state}**")
            self._writer.close()


class RunLog:
    """This process's log records: counted, echoed, appended to the run's log, shown as text.

    Every rank appends its own records (tagged with its rank under DDP); the terminal shows the
    first line (a traceback stays in the file); TensorBoard text goes through the sink (rank 0).
    The WARNING and ERROR counts feed the health score; the training thread and the monitor's
    background threads all log, so they are counted under a lock.
    """

    def __init__(self, run: RunDir, progress: Progress, sink: Sink, reporter: Reporter, *,
                 rank: int | None, lead: bool):
        self._run, self._progress, self._sink, self._reporter = run, progress, sink, reporter
        self._rank, self._rank_field = rank, {} if rank is None else {"rank": rank}
        self._lead = lead
        self._lock = threading.Lock()

    def write(self, level: str, message: str, *, echo: bool = True) -> None:
        level = level.upper()
        with self._lock:
            if level == "WARNING":
                self._progress.warnings += 1
            elif level == "ERROR":
                self._progress.errors += 1
        if echo:
            self._reporter.log(level, message.split("\n", 1)[0])
        self._run.append_log(level, message, **self._rank_field)
        stamp = time.strftime("%H:%M:%S")
        self._sink.text(self._progress.global_step, "logs", f"`{stamp}` **{level}** {message}")

    def once(self, level: str, message: str) -> None:
        """A run-wide event that every DDP rank meets at the same step: recorded once, by rank 0."""
        if self._lead:
            self.write(level, message)

    def crash(self, exc: BaseException) -> str:
        """Record a crash (the traceback in the log, one line on the terminal); returns the one
        line the status shows. Under DDP a rank other than 0 also records its failure for rank 0,
        and rank 0 names the first rank that failed: the root cause, not its own broken pipe."""
        where = "" if self._rank is None else f"rank {self._rank}: "
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.write("ERROR", f"{where}training failed: {type(exc).__name__}: {exc}\n{tb}", echo=False)
        self._reporter.log("ERROR", f"training failed: {type(exc).__name__}: {exc}")
        message = f"{where}{type(exc).__name__}: {exc}"
        if self._rank is not None and not self._lead:
            self._run.record_rank_failure(self._rank, message)
        elif self._rank is not None and (peers := self._run.rank_failures()):
            message = peers[0]["message"]
        return message


def record_alerts(events: list[AlertEvent], sink: Sink, log: RunLog) -> list[tuple[str, str]]:
    """Record alert events: the alerts file, a log line and TensorBoard text when an episode
    begins or resolves. Returns ``(action, rule)`` of the episodes that began asking to pause or
    stop: the caller queues them for the training thread (this may run on the watchdog's)."""
    actions = []
    for event in events:
        alert = event.record
        sink.alert(alert)
        if alert.get("resolved"):
            log.write("INFO", f"resolved: {alert['message']}")
        elif event.starts_episode:
            log.write("ERROR" if alert["severity"] == "critical" else "WARNING", f"[{alert['rule']}] {alert['message']}")
            sink.text(alert.get("step") or 0, "alerts", f"**{alert['severity'].upper()} {alert['rule']}**: {alert['message']}")
            if alert.get("action") in ("stop", "pause"):
                actions.append((alert["action"], alert["rule"]))
    return actions

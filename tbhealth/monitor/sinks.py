"""Where a run's records go: TensorBoard scalars and text, alert records, status, log lines.

Under DDP rank 0 writes the run's files and every rank is measured, logs and obeys control.
That decision is made once, when the Monitor picks its sink: rank 0 gets a :class:`RunSink`,
every other rank the do-nothing :class:`Sink`, so the code that produces records never asks
"am I rank 0?". Log lines are the exception by design: every rank appends its own (with its
rank) to the run's log, which is how a crash on rank 3 leaves its traceback; :class:`RunLog`
keeps that apart from the sink.

Writing the log, the alerts and the status must never end a run (:class:`StateWrites`): they are
for the people watching, and a run that dies because its log became unwritable loses far more
than the log. A full disk is the exception that stops the run: nothing more could be saved.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tbhealth.health.alerts import AlertEvent
from tbhealth.monitor.events import EventWriter, Mark
from tbhealth.run.files import FORMAT_VERSION, json_default
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


#: errno values that mean no more bytes fit, whatever file is written next.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


class StateWrites:
    """Writes of the run's log, alerts and status that must not end the training.

    A failed write (a full disk, a state file replaced by a folder, permissions taken away) is
    told once on stderr, the next record tries again, and the recovery is told with the number of
    records lost. A full disk is reported once through ``on_disk_full`` (the Monitor stops the run
    there, with a checkpoint if one still fits) and remembered in :attr:`disk_full`.
    """

    def __init__(self) -> None:
        self.on_disk_full: Callable[[str], None] | None = None
        self.disk_full: str | None = None  # why, once a write found no space left
        self._lost: dict[str, int] = {}  # per kind of record: failures since it last worked
        self._lock = threading.Lock()  # the training thread, the heartbeat and the watchdog write

    def attempt(self, what: str, write: Callable[[], None], *, reraise: bool = False) -> bool:
        """``write()``; an OSError is reported (see the class doc) and, unless ``reraise``, not
        raised. True if it worked."""
        try:
            write()
        except OSError as e:
            self._failed(what, e)
            if reraise:
                raise
            return False
        if what in self._lost:
            with self._lock:
                lost = self._lost.pop(what, 0)
            _tell(f"the run's {what} is written again ({lost} record(s) could not be written meanwhile)")
        return True

    def note_disk_full(self, what: str, exc: OSError) -> None:
        """No space left (found writing ``what``): say so and call ``on_disk_full`` the first time."""
        with self._lock:
            if self.disk_full is not None:
                return
            self.disk_full = (f"the disk is full ({_describe(exc)} while writing the {what}); free space, "
                              "then continue with --resume")
        if self.on_disk_full is not None:
            self.on_disk_full(self.disk_full)

    def _failed(self, what: str, exc: OSError) -> None:
        with self._lock:
            first = what not in self._lost
            self._lost[what] = self._lost.get(what, 0) + 1
        if first:
            _tell(f"could not write the run's {what} ({_describe(exc)}); training goes on and tries again "
                  "with each record")
        if is_disk_full(exc):
            self.note_disk_full(what, exc)


def _describe(exc: OSError) -> str:
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)


def _tell(message: str) -> None:
    """One line on stderr: the run's own log may be what cannot be written."""
    try:
        sys.stderr.write(f"tbhealth: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def overwrite_status(path: Path, status: dict) -> None:
    """Rewrite the status in place (truncate, write): not atomic, so only for the final state on
    a full disk, where the temp file of an atomic write finds no room but the old status's own
    blocks, freed by the truncation, hold the new one."""
    body = json.dumps({"v": FORMAT_VERSION, **status, "updated_at": time.time()}, separators=(",", ":"),
                      default=json_default).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class Sink:
    """The records of one run. This base drops everything: the sink of every rank but 0."""

    def __init__(self) -> None:
        self.writes = StateWrites()  # how this process's state-file writes are doing

    def open(self, health_settings: dict, layers: list[str] | None = None) -> None:
        """Start writing; ``health_settings`` are the run's resolved ``health:`` thresholds,
        ``layers`` the measured layers in model order (None: health checks off)."""

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

    def events_mark(self) -> Mark | None:
        """A place in the TensorBoard events queued so far (None: no events written here); a
        checkpoint waits for it off the training thread (:meth:`EventWriter.mark`)."""
        return None


class RunSink(Sink):
    """Rank 0's sink: the run's TensorBoard event file and its run-state files."""

    def __init__(self, run: RunDir):
        super().__init__()
        self._run = run
        self._writer: EventWriter | None = None  # opened by open(): no file before start()
        self._status_lock = threading.Lock()  # the heartbeat thread and close() both write
        self._final_written = False

    def open(self, health_settings: dict, layers: list[str] | None = None) -> None:
        self._run.state_dir.mkdir(parents=True, exist_ok=True)
        self._run.write_health_settings(health_settings)
        if layers:
            self._run.write_layers(layers)
        self._writer = EventWriter(self._run.path, flush_secs=1.0)
        self._writer.custom_scalars(CUSTOM_SCALARS)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None and values:
            self._writer.scalars(step, values)

    def text(self, step: int, tag: str, markdown: str) -> None:
        if self._writer is not None:
            self._writer.text(step, tag, markdown)

    def alert(self, record: dict) -> None:
        self.writes.attempt("alerts", lambda: self._run.append_alert(record))

    def status(self, doc: dict) -> None:
        """Raises what the write raises: the heartbeat logs it and retries (:mod:`periodic`)."""
        final = doc["state"] in FINAL_STATES
        with self._status_lock:
            if self._final_written:  # a late heartbeat must not turn "completed" back into "training"
                return
            try:
                self.writes.attempt("status", lambda: self._run.write_status(doc), reraise=True)
            except OSError:
                if not (final and self.writes.disk_full):
                    raise
                # the last word must be true: squeeze it into the old status's own blocks
                self.writes.attempt("status", lambda: overwrite_status(self._run.status_path, doc), reraise=True)
            self._final_written = final

    def close(self, step: int, state: str) -> None:
        if self._writer is not None:
            self._writer.text(step, "run/state", f"Run finished: **{state}**")
            self.writes.attempt("TensorBoard events", self._writer.close)  # its last flush may find the disk full

    def events_mark(self) -> Mark | None:
        return self._writer.mark() if self._writer is not None else None


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
        self._sink.writes.attempt("log", lambda: self._run.append_log(level, message, **self._rank_field))
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
            log.write("INFO", f"[{alert['rule']}] {alert['message']}")  # "Resolved: ..." says what cleared
        elif event.starts_episode:
            stack = f"\n{alert['stack']}" if alert.get("stack") else ""  # where a stalled step waits
            log.write("ERROR" if alert["severity"] == "critical" else "WARNING",
                      f"[{alert['rule']}] {alert['message']}{stack}")
            sink.text(alert.get("step") or 0, "alerts", f"**{alert['severity'].upper()} {alert['rule']}**: {alert['message']}")
            if alert.get("action") in ("stop", "pause"):
                actions.append((alert["action"], alert["rule"]))
    return actions

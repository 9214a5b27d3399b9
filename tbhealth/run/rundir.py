"""One run's directory: where each piece of run state lives, and typed reads and writes of it.

The trainer, the CLI and the TensorBoard plugin all go through :class:`RunDir`, so the format
can change in one place. It imports nothing heavy (no torch): the plugin uses it.

Layout of ``<logdir>/<run>/``::

    events.out.tfevents.*          TensorBoard event files (written by tbhealth.monitor.events)
    config.yaml                    the resolved config
    checkpoints/*.pt               checkpoints (tbhealth.training.checkpoint)
    plugins/tbhealth/status.json   heartbeat snapshot, replaced atomically
    plugins/tbhealth/log.jsonl     log records, append-only
    plugins/tbhealth/alerts.jsonl  alert events, append-only (a later record with the same id wins)
    plugins/tbhealth/control.jsonl control requests, append-only (CLI and plugin write)
    plugins/tbhealth/acks.jsonl    acknowledgements of control requests, append-only (trainer writes)
    plugins/tbhealth/health.json   the run's health settings (thresholds, actions), written at start
    plugins/tbhealth/layers.json   the model's measured layers in model order, written at start

How each file is written (atomic snapshots, locked appends, the version ``v``, no symlink
followed below the run directory) is :mod:`tbhealth.run.files`; what a reader accepts from a file
anyone may have written is :mod:`tbhealth.run.checks`; the states a status may hold are
:mod:`tbhealth.run.states`. Readers report a damaged or planted file (``StateFileError``, an
``OSError``) or skip a bad line; they never let one bad file raise anything else.
"""

from __future__ import annotations

import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Any

from tbhealth.run.checks import ControlRequest, alert_problem, parse_request, status_problem
from tbhealth.run.files import (
    FORMAT_VERSION, append_record, file_size, load_json, read_json, read_lines, read_records, write_json_atomic,
)
from tbhealth.run.safeopen import open_file
from tbhealth.run.states import COMMANDS, NO_STATUS_WHY, NOT_LIVE_WHY, is_live
from tbhealth.run.status import effective_status
from tbhealth.run.tail import Follower, read_tail

STATE_SUBDIR = Path("plugins") / "tbhealth"
CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.yaml"


class RunNotLiveError(Exception):
    """A control request for a run that cannot act on it; nothing was sent.

    ``state`` is the run's effective state (``unknown`` without a readable status) and ``why``
    says in a few words why such a run cannot act, so each front end can phrase its answer.
    """

    def __init__(self, run: Path, state: str, command: str):
        self.run, self.state, self.command = run, state, command
        self.why = NOT_LIVE_WHY.get(state, NO_STATUS_WHY)
        super().__init__(f"run {run} is {state}: {command} not sent ({self.why})")


_CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}\.pt")


class RunDir:
    """Paths and typed reads/writes of one run's state. Cheap to construct; holds no open files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state_dir = self.path / STATE_SUBDIR
        self.status_path = self.state_dir / "status.json"
        self.log_path = self.state_dir / "log.jsonl"
        self.alerts_path = self.state_dir / "alerts.jsonl"
        self.control_path = self.state_dir / "control.jsonl"
        self.acks_path = self.state_dir / "acks.jsonl"
        self.rank_failures_path = self.state_dir / "rank_failures.jsonl"
        self.health_settings_path = self.state_dir / "health.json"
        self.layers_path = self.state_dir / "layers.json"
        self.config_path = self.path / CONFIG_FILE
        self.checkpoint_dir = self.path / CHECKPOINT_SUBDIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def exists(self) -> bool:
        """Whether a status file (of whatever kind: reading it says what is wrong) is there."""
        return os.path.lexists(self.status_path)

    # -- status -------------------------------------------------------------------------------

    def write_status(self, status: dict) -> None:
        write_json_atomic(self.status_path, {"v": FORMAT_VERSION, **status, "updated_at": time.time()}, root=self.path)

    def read_status(self, now: float | None = None) -> dict | None:
        """The last heartbeat with ``state`` made effective: ``unresponsive`` when stale.

        The state the trainer wrote stays available as ``reported_state``. None when there is
        none yet or it cannot be used (:meth:`read_status_checked` says why).
        """
        return self.read_status_checked(now)[0]

    def read_status_checked(self, now: float | None = None) -> tuple[dict | None, str | None]:
        """``(status, None)``; ``(None, None)`` while there is no status yet; ``(None, why)`` when
        the file cannot be used (a symlink, a FIFO, not JSON, a field of the wrong type, …)."""
        try:
            status = load_json(self.status_path, root=self.path)
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, str(e)
        problem = status_problem(status)
        if problem:
            return None, f"status.json {problem}"
        return effective_status(status, now), None

    # -- health settings --------------------------------------------------------------------

    def write_health_settings(self, settings: dict) -> None:
        """The run's resolved ``health:`` settings, written once at start, so readers (the Health
        tab) judge and colour with this run's own thresholds, not the defaults."""
        write_json_atomic(self.health_settings_path, {"v": FORMAT_VERSION, "health": settings}, root=self.path)

    def read_health_settings(self) -> dict | None:
        doc = read_json(self.health_settings_path, root=self.path)
        health = doc.get("health") if isinstance(doc, dict) else None
        return health if isinstance(health, dict) else None

    # -- layers -------------------------------------------------------------------------------

    def write_layers(self, names: list[str]) -> None:
        """The names of the layers the health instruments measure, in model order
        (``named_modules()`` order), written once at start. TensorBoard lists the per-layer series
        ``health/<metric>/<layer>`` in an order of its own (the Rust data server's is arbitrary);
        the Health tab's per-layer view orders its rows by this list."""
        write_json_atomic(self.layers_path, {"v": FORMAT_VERSION, "layers": [str(n) for n in names]}, root=self.path)

    def read_layers(self) -> list[str] | None:
        """The layer names in model order, or None when the run did not write them."""
        doc = read_json(self.layers_path, root=self.path)
        layers = doc.get("layers") if isinstance(doc, dict) else None
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            return None
        return layers

    # -- log ----------------------------------------------------------------------------------

    def append_log(self, level: str, message: str, t: float | None = None, **extra: Any) -> None:
        level = level.upper()
        append_record(self.log_path, {"time": t or time.time(), "level": level, "message": message, **extra},
                      root=self.path)

    def read_log(self, offset: int = 0) -> tuple[list[dict], int]:
        """Log records from byte ``offset`` and the offset to continue from (StateFileError when the
        log is there but must not be read)."""
        records, new_offset = read_records(self.log_path, offset, root=self.path)
        return [r for r in records if "_malformed" not in r], new_offset

    def read_log_tail(self, offset: int, max_records: int) -> tuple[list[dict], int, int]:
        """The newest ``max_records`` log records after ``offset``, the offset after them and how
        many lines before them were left out; reads the file from its end."""
        records, new_offset, skipped = read_tail(self.log_path, max_records, offset, root=self.path)
        return [r for r in records if "_malformed" not in r], new_offset, skipped

    # -- alerts -------------------------------------------------------------------------------

    def append_alert(self, alert: dict) -> None:
        """Record an alert event: fired, updated or resolved. Same ``id`` → same episode."""
        append_record(self.alerts_path, alert, root=self.path)

    def read_alerts(self) -> list[dict]:
        """Alert episodes, latest state of each, oldest first; records that are not alerts (a
        list for an id, a time in the year 10^12) are skipped. StateFileError when the file is
        there but must not be read."""
        records, _ = read_records(self.alerts_path, root=self.path)
        good = [r for r in records if "_malformed" not in r and alert_problem(r) is None]
        by_id: dict[str, dict] = {}
        for r in good:
            r.pop("v", None)
            by_id[r["id"]] = {**by_id.get(r["id"], {}), **r}
        return list(by_id.values())

    def alert_ids_after(self, offset: int) -> tuple[set[str], int]:
        """Ids of the alert episodes touched by records from byte ``offset`` on, and the offset
        after them: what the Health tab's cursor asks for."""
        records, end = read_records(self.alerts_path, offset, root=self.path)
        return {r["id"] for r in records if "_malformed" not in r and alert_problem(r) is None}, end

    # -- control ------------------------------------------------------------------------------

    def send_control(self, command: str, source: str) -> str:
        """Queue ``command`` if the run is live (the one check the CLI and the Health tab share);
        returns the request's id. :class:`RunNotLiveError` when it is not: nothing is written.

        Live is judged from the status as readers see it, so a killed trainer (stale heartbeat)
        is not sent requests that nobody will ever answer.
        """
        status = self.read_status()
        state = status["state"] if status else "unknown"
        if not is_live(state):
            raise RunNotLiveError(self.path, state, command)
        return self.request_control(command, source)

    def request_control(self, command: str, source: str = "cli") -> str:
        """Append a control request; returns its id. The trainer acknowledges it in acks.jsonl."""
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
        rid = uuid.uuid4().hex[:12]
        append_record(self.control_path, {"id": rid, "command": command, "source": source, "time": time.time()},
                      root=self.path)
        return rid

    def control_size(self) -> int:
        return file_size(self.control_path)

    def read_control(self, offset: int = 0) -> tuple[list[ControlRequest], int]:
        """New requests from ``offset``; malformed lines come back with ``error`` set."""
        pairs, new_offset = read_lines(self.control_path, offset, root=self.path)
        return self.parse_control(pairs), new_offset

    @staticmethod
    def parse_control(pairs: list[tuple[int, dict]]) -> list[ControlRequest]:
        """``(line offset, record)`` pairs as requests (bad lines with ``error`` and a stable id)."""
        return [parse_request(record, at) for at, record in pairs]

    def follow_control(self) -> Follower:
        """A reader of new control lines that survives truncation or replacement of the file."""
        return Follower(self.control_path, root=self.path)

    def acknowledge(self, request_id: str, status: str, detail: str = "", **extra: Any) -> None:
        """``status`` is ``done`` or ``rejected``; ``detail`` says what happened or why not."""
        append_record(
            self.acks_path,
            {"id": request_id, "status": status, "detail": detail, "time": time.time(), **extra},
            root=self.path,
        )

    def read_acks(self) -> dict[str, dict]:
        """Acknowledgements by request id (lines without a string id are skipped)."""
        records, _ = read_records(self.acks_path, root=self.path)
        return {r["id"]: r for r in records if isinstance(r.get("id"), str)}

    def wait_for_ack(self, request_id: str, timeout: float, poll: float = 0.05) -> dict | None:
        """The acknowledgement of ``request_id``, or None after ``timeout`` seconds. Keeps looking
        when acks.jsonl is truncated or replaced meanwhile, or is briefly not a plain file."""
        deadline = time.monotonic() + timeout
        acks = Follower(self.acks_path, root=self.path)
        while True:
            try:
                found = [r for _, r in acks.read() if r.get("id") == request_id]
            except OSError:
                found = []
            if found:
                return found[0]
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)

    # -- distributed ----------------------------------------------------------------------------

    def record_rank_failure(self, rank: int, message: str) -> None:
        """A rank other than 0 crashed: rank 0's heartbeat must report ``failed`` with this."""
        append_record(self.rank_failures_path, {"rank": rank, "message": message, "time": time.time()},
                      root=self.path)

    def rank_failures(self) -> list[dict]:
        if not file_size(self.rank_failures_path):  # the common case costs one stat
            return []
        try:
            records, _ = read_records(self.rank_failures_path, root=self.path)
        except OSError:  # not a plain file: the heartbeat that asks must go on
            return []
        return [r for r in records if "rank" in r]

    # -- checkpoints --------------------------------------------------------------------------

    def list_checkpoints(self) -> list[Path]:
        """Checkpoint files (regular files, never links), oldest first by modification time."""
        if os.path.islink(self.checkpoint_dir):
            return []
        try:
            entries = list(os.scandir(self.checkpoint_dir))
        except OSError:
            return []
        found = []
        for e in entries:
            try:
                if Path(e.name).suffix == ".pt" and e.is_file(follow_symlinks=False):
                    found.append((e.stat(follow_symlinks=False).st_mtime, e.name, Path(e.path)))
            except OSError:  # removed meanwhile (rotation)
                continue
        return [p for _, _, p in sorted(found)]

    def checkpoint_file(self, name: str) -> Path | None:
        """The checkpoint called ``name`` in this run, or None; never a path outside it."""
        if not _CHECKPOINT_NAME.fullmatch(name or "") or name.startswith("."):
            return None
        path = self.checkpoint_dir / name
        try:  # a symlink could point anywhere: never one, nor a linked checkpoints folder
            ok = stat.S_ISDIR(os.lstat(self.checkpoint_dir).st_mode) and stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            ok = False
        return path if ok else None

    def open_checkpoint(self, name: str) -> int | None:
        """A descriptor of the regular file ``checkpoints/<name>``, opened once without following
        any symlink: serve from it, so what was checked is what is sent. None when there is none."""
        if self.checkpoint_file(name) is None:
            return None
        try:
            return open_file(self.checkpoint_dir / name, root=self.path)
        except OSError:
            return None


__all__ = ["STATE_SUBDIR", "CHECKPOINT_SUBDIR", "CONFIG_FILE", "RunDir", "ControlRequest", "RunNotLiveError"]

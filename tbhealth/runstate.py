"""The run-directory format: the one place that knows where run state lives and how it is written.

The trainer, the CLI and the TensorBoard plugin all read and write through this module, so the
format can change in one place. It imports nothing heavy (no torch): the plugin uses it.

Layout of ``<logdir>/<run>/``::

    events.out.tfevents.*          TensorBoard event files (written by tbhealth.events)
    config.yaml                    the resolved config
    checkpoints/*.pt               checkpoints (tbhealth.checkpoint)
    plugins/tbhealth/status.json   heartbeat snapshot, replaced atomically
    plugins/tbhealth/log.jsonl     log records, append-only
    plugins/tbhealth/alerts.jsonl  alert events, append-only (a later record with the same id wins)
    plugins/tbhealth/control.jsonl control requests, append-only (CLI and plugin write)
    plugins/tbhealth/acks.jsonl    acknowledgements of control requests, append-only (trainer writes)

Why this shape: snapshots are rewritten whole with temp file + ``os.replace`` so a reader never
sees half a file; records are appended one line per ``os.write`` under an advisory lock, so
several writers (four CLI processes, the plugin) interleave whole lines, and a line cut short by a
crash is fenced off by the next writer and skipped by readers. Every record carries ``v``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
STATE_SUBDIR = Path("plugins") / "tbhealth"
CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.yaml"

STATES = ("starting", "training", "paused", "stopping", "stopped", "completed", "failed")
FINAL_STATES = frozenset({"stopped", "completed", "failed"})
UNRESPONSIVE = "unresponsive"
#: A live run rewrites its status at least every second (paused too); after this long without a
#: heartbeat, readers report it ``unresponsive`` (a ``kill -9``, a hung node, a lost filesystem).
STALE_AFTER_S = 10.0

COMMANDS = ("pause", "resume", "stop", "checkpoint")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_RUN_PART = re.compile(r"^[A-Za-z0-9_.@+=-]+$")


class RunNameError(ValueError):
    """A run name that would leave the logdir or is not a plain relative path."""


# --------------------------------------------------------------------------- atomic primitives


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # dumps + one write: json.dump's streaming encoder is ~6x slower for a status snapshot
            f.write(json.dumps(data, separators=(",", ":"), default=_json_default))
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing, unreadable or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line. Safe with concurrent writers and after a writer crashed mid-line."""
    line = json.dumps({"v": FORMAT_VERSION, **record}, separators=(",", ":"), default=_json_default)
    data = (line + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # fence off a line a crashed writer left unterminated
            _write_all(fd, data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_records(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete records from byte ``offset`` on, and the offset to continue from.

    A trailing line without its newline is not returned (its writer may still be writing), and
    the returned offset stops before it. Lines that are not JSON objects come back as
    ``{"_malformed": <text>}`` so a consumer can reject them without losing its place.
    """
    try:
        with open(path, "rb") as f:
            f.seek(max(0, offset))
            chunk = f.read()
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    records = []
    for raw in chunk[: end + 1].splitlines():
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            rec = {"_malformed": raw.decode("utf-8", "replace")[:500]}
        records.append(rec)
    return records, offset + end + 1


def file_size(path: Path) -> int:
    """Size of ``path`` (0 when missing): the cheap ``stat`` the trainer polls for control."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------- run names


def resolve_run(logdir: str | os.PathLike, run: str) -> Path:
    """The directory of ``run`` under ``logdir``; RunNameError for anything that could escape it.

    A run name is TensorBoard's: the path relative to the logdir, ``/``-separated, ``.`` for the
    logdir itself. Absolute paths, ``..``, empty parts, backslashes, control characters and
    symlinks that lead outside are refused.
    """
    if not isinstance(run, str) or not run or len(run) > 512:
        raise RunNameError("run name must be a non-empty string of at most 512 characters")
    base = Path(logdir).resolve()
    if run == ".":
        return base
    parts = run.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _RUN_PART.match(part):
            raise RunNameError(
                f"invalid run name {run!r}: use letters, digits and _.@+=- separated by '/'"
            )
    target = (base / Path(*parts)).resolve()
    if target != base and base not in target.parents:
        raise RunNameError(f"run {run!r} resolves outside the logdir")
    return target


def run_name(logdir: str | os.PathLike, run_dir: str | os.PathLike) -> str:
    """TensorBoard's name for ``run_dir``: its path relative to the logdir."""
    rel = os.path.relpath(Path(run_dir).resolve(), Path(logdir).resolve())
    return "." if rel == "." else rel.replace(os.sep, "/")


def unique_run_dir(logdir: str | os.PathLike, name: str) -> Path:
    """``logdir/name``, or ``name-2``, ``name-3``… when taken; created so a rival process can't take it."""
    resolve_run(logdir, name)  # validates
    base = Path(logdir)
    base.mkdir(parents=True, exist_ok=True)
    candidate, n = name, 1
    while True:
        path = base / candidate
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            candidate = f"{name}-{n}"


def list_run_dirs(logdir: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """Run directories under ``logdir`` (those with tbhealth state), found with ``scandir``."""
    found: list[Path] = []
    root = Path(logdir)

    def walk(d: Path, depth: int) -> None:
        if (d / STATE_SUBDIR / "status.json").is_file():
            found.append(d)
            return
        if depth >= max_depth:
            return
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if e.name.startswith(".") or e.name in ("plugins", CHECKPOINT_SUBDIR):
                continue
            if e.is_dir(follow_symlinks=False):
                walk(Path(e.path), depth + 1)

    walk(root, 0)
    return found


# --------------------------------------------------------------------------- the run directory


@dataclass(frozen=True)
class ControlRequest:
    """A request as read back by the trainer. ``error`` is set for a line it must reject."""

    id: str
    command: str
    source: str = ""
    time: float = 0.0
    error: str | None = None


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
        self.config_path = self.path / CONFIG_FILE
        self.checkpoint_dir = self.path / CHECKPOINT_SUBDIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def exists(self) -> bool:
        return self.status_path.is_file()

    # -- status -------------------------------------------------------------------------------

    def write_status(self, status: dict) -> None:
        write_json_atomic(self.status_path, {"v": FORMAT_VERSION, **status, "updated_at": time.time()})

    def read_status(self, now: float | None = None) -> dict | None:
        """The last heartbeat with ``state`` made effective: ``unresponsive`` when stale.

        The state the trainer wrote stays available as ``reported_state``.
        """
        status = read_json(self.status_path)
        if not isinstance(status, dict) or "state" not in status:
            return None
        status["reported_state"] = status["state"]
        status["state"] = effective_state(status, now)
        return status

    # -- log ----------------------------------------------------------------------------------

    def append_log(self, level: str, message: str, t: float | None = None, **extra: Any) -> None:
        level = level.upper()
        append_record(self.log_path, {"time": t or time.time(), "level": level, "message": message, **extra})

    def read_log(self, offset: int = 0) -> tuple[list[dict], int]:
        records, new_offset = read_records(self.log_path, offset)
        return [r for r in records if "_malformed" not in r], new_offset

    # -- alerts -------------------------------------------------------------------------------

    def append_alert(self, alert: dict) -> None:
        """Record an alert event: fired, updated or resolved. Same ``id`` → same episode."""
        append_record(self.alerts_path, alert)

    def read_alerts(self) -> list[dict]:
        """Alert episodes, latest state of each, oldest first."""
        records, _ = read_records(self.alerts_path)
        by_id: dict[str, dict] = {}
        for r in records:
            if "_malformed" in r or "id" not in r:
                continue
            r.pop("v", None)
            by_id[r["id"]] = {**by_id.get(r["id"], {}), **r}
        return list(by_id.values())

    # -- control ------------------------------------------------------------------------------

    def request_control(self, command: str, source: str = "cli") -> str:
        """Append a control request; returns its id. The trainer acknowledges it in acks.jsonl."""
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
        rid = uuid.uuid4().hex[:12]
        append_record(self.control_path, {"id": rid, "command": command, "source": source, "time": time.time()})
        return rid

    def control_size(self) -> int:
        return file_size(self.control_path)

    def read_control(self, offset: int = 0) -> tuple[list[ControlRequest], int]:
        """New requests from ``offset``; malformed lines come back with ``error`` set."""
        records, new_offset = read_records(self.control_path, offset)
        out = []
        for i, r in enumerate(records):
            out.append(_parse_request(r, f"{offset}-{i}"))
        return out, new_offset

    def acknowledge(self, request_id: str, status: str, detail: str = "", **extra: Any) -> None:
        """``status`` is ``done`` or ``rejected``; ``detail`` says what happened or why not."""
        append_record(
            self.acks_path,
            {"id": request_id, "status": status, "detail": detail, "time": time.time(), **extra},
        )

    def read_acks(self) -> dict[str, dict]:
        records, _ = read_records(self.acks_path)
        return {r["id"]: r for r in records if "id" in r and "_malformed" not in r}

    def wait_for_ack(self, request_id: str, timeout: float, poll: float = 0.05) -> dict | None:
        """The acknowledgement of ``request_id``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        offset = 0
        while True:
            records, offset = read_records(self.acks_path, offset)
            for r in records:
                if r.get("id") == request_id:
                    return r
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)

    # -- distributed ----------------------------------------------------------------------------

    def record_rank_failure(self, rank: int, message: str) -> None:
        """A rank other than 0 crashed: rank 0's heartbeat must report ``failed`` with this."""
        append_record(self.rank_failures_path, {"rank": rank, "message": message, "time": time.time()})

    def rank_failures(self) -> list[dict]:
        if not file_size(self.rank_failures_path):  # the common case costs one stat
            return []
        records, _ = read_records(self.rank_failures_path)
        return [r for r in records if "rank" in r]

    # -- checkpoints --------------------------------------------------------------------------

    def list_checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first by modification time."""
        try:
            files = [p for p in self.checkpoint_dir.iterdir()
                     if p.suffix == ".pt" and p.is_file() and not p.is_symlink()]
        except OSError:
            return []
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def checkpoint_file(self, name: str) -> Path | None:
        """The checkpoint called ``name`` in this run, or None; never a path outside it."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}\.pt", name or "") or name.startswith("."):
            return None
        path = self.checkpoint_dir / name
        # a symlink could point anywhere: never serve one
        return path if path.is_file() and not path.is_symlink() else None


def effective_state(status: dict, now: float | None = None) -> str:
    state = status.get("state", "starting")
    if state in FINAL_STATES:
        return state
    updated = status.get("updated_at")
    now = time.time() if now is None else now
    if not isinstance(updated, (int, float)) or now - updated > STALE_AFTER_S:
        return UNRESPONSIVE
    return state


def is_live(state: str) -> bool:
    """Whether a run in ``state`` can act on a control request."""
    return state in ("starting", "training", "paused")


def _parse_request(r: dict, fallback_id: str) -> ControlRequest:
    if "_malformed" in r:
        return ControlRequest(id=f"malformed-{fallback_id}", command="", error=f"not a JSON object: {r['_malformed'][:80]!r}")
    rid = r.get("id")
    if not isinstance(rid, str) or not rid:
        rid = f"noid-{fallback_id}"
        return ControlRequest(id=rid, command=str(r.get("command")), error="request has no id")
    command = r.get("command")
    if command not in COMMANDS:
        return ControlRequest(id=rid, command=str(command), error=f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
    return ControlRequest(id=rid, command=command, source=str(r.get("source", "")), time=float(r.get("time") or 0))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


__all__ = [
    "FORMAT_VERSION", "STATES", "FINAL_STATES", "UNRESPONSIVE", "STALE_AFTER_S", "COMMANDS", "LEVELS",
    "RunDir", "RunNameError", "ControlRequest", "resolve_run", "run_name", "unique_run_dir",
    "list_run_dirs", "effective_state", "is_live", "write_json_atomic", "write_text_atomic",
    "read_json", "append_record", "read_records", "file_size",
]

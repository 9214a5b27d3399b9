"""How run-state files are written and read: atomic snapshots and append-only JSON lines.

Everything that touches a run-state file goes through here (status, log, alerts, control,
acks, the resolved config and checkpoints), so the guarantees hold in one place:

* a snapshot is written to a temp file in the same folder and renamed over the target, so a
  reader sees the old file or the new one, never half of one;
* a record is one JSON line appended with one ``os.write`` under an advisory lock, so several
  writers interleave whole lines, and a line cut short by a crash is fenced off by the next
  writer and skipped by readers;
* every record and snapshot carries the format version ``v``;
* files are created with the process umask (as any other file), so a teammate's TensorBoard
  can read them.

Nothing here imports torch: the TensorBoard plugin uses it.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

FORMAT_VERSION = 1
#: A temp file of an atomic write: ``.<target name>.<random>.tmp`` next to its target.
TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, durable: bool = False) -> None:
    """Replace ``path`` with what ``write(f)`` writes into a binary file, all or nothing.

    ``durable``: also ``fsync`` the file and its folder, so the new content survives a power
    loss (checkpoints); status snapshots skip it, a newer one follows within a second.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON (dumps + one write: the streaming encoder is ~6x slower)."""
    body = json.dumps(data, separators=(",", ":"), default=json_default).encode("utf-8")
    atomic_write(path, lambda f: f.write(body))


def write_text_atomic(path: Path, text: str) -> None:
    body = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(body))


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing, unreadable or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line. Safe with concurrent writers and after a writer crashed mid-line."""
    line = json.dumps({"v": FORMAT_VERSION, **record}, separators=(",", ":"), default=json_default)
    data = (line + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
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


def unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _write_all(fd: int, data: bytes) -> None:
    """Append all of ``data`` or none of it: a write cut short (a full disk) is truncated away, so
    the file never ends in half a record. The caller holds the file's lock."""
    view, size = memoryview(data), os.fstat(fd).st_size
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        if len(view) < len(data):
            os.ftruncate(fd, size)
        raise


__all__ = [
    "FORMAT_VERSION", "TEMP_SUFFIX", "atomic_write", "write_json_atomic", "write_text_atomic", "fsync_dir",
    "read_json", "append_record", "read_records", "file_size", "unlink_quietly", "json_default",
]

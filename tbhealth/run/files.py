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
  can read them;
* **no symlink is followed below ``root``** (the run directory, or the file's own folder when no
  root is given): each folder and the file are opened relative to the one above with
  ``O_NOFOLLOW``, so a link planted in a run cannot send a read or a write outside it. A writer
  replaces a link, FIFO or other odd entry where its file or folder belongs (the link's target
  is never touched); a reader reports it (:class:`StateFileError`). Reads never block: files are
  opened ``O_NONBLOCK`` and anything but a regular file is refused, so a FIFO cannot hang a reader.

Nothing here imports torch: the TensorBoard plugin uses it.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

FORMAT_VERSION = 1
#: A temp file of an atomic write: ``.<target name>.<random>.tmp`` next to its target.
TEMP_SUFFIX = ".tmp"
#: Largest snapshot (status.json, health.json) a reader loads; a status is a few kilobytes.
MAX_SNAPSHOT_BYTES = 8 << 20
#: Longest record line; tbhealth's own are under 10 KB. A longer line is malformed.
MAX_LINE_BYTES = 1 << 20
#: Deepest JSON nesting accepted; tbhealth's own documents nest five levels.
MAX_JSON_DEPTH = 32
#: Bytes read at a time from a record file.
CHUNK = 1 << 20
_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR = os.O_RDONLY | os.O_DIRECTORY


class StateFileError(OSError):
    """A run-state file (or a folder on its way) that exists but must not be used: a symlink, a
    FIFO, a folder, unreadable, too large, not JSON. ``str()`` names the file and says why."""


# --------------------------------------------------------------------------- opening without following links


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link (tbhealth never follows links inside a run)"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a device or other special file"


def _open_at(dir_fd: int, name: str, flags: int, rel: str, create: bool, folder: bool) -> int:
    """Open ``name`` in ``dir_fd`` without following it; a writer (``create``) replaces whatever
    odd entry sits there, a reader gets a StateFileError saying what it found."""
    want = "a folder" if folder else "a regular file"
    for _ in range(3):  # a rival that keeps re-planting a link gets an error, not a loop
        try:
            fd = os.open(name, flags | _OPEN, 0o666, dir_fd=dir_fd)
        except FileNotFoundError:
            if not (create and folder):
                raise
            _mkdir_at(dir_fd, name)
            continue
        except OSError as e:
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except OSError:
                mode = None
            if mode is None or (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
                raise StateFileError(f"cannot open {rel}: {e.strerror}") from e
            if not (create and _replaceable(mode)):
                raise StateFileError(f"{rel} is {_describe(mode)}, not {want}") from e
            os.unlink(name, dir_fd=dir_fd)
            continue
        if folder:  # O_DIRECTORY: it is one
            return fd
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return fd
        os.close(fd)
        if not (create and _replaceable(mode)):
            raise StateFileError(f"{rel} is {_describe(mode)}, not {want}")
        os.unlink(name, dir_fd=dir_fd)
    raise StateFileError(f"{rel} keeps being replaced by something that is not {want}")


def _replaceable(mode: int) -> bool:
    """A writer may remove what sits where its file or folder belongs unless it holds data: a
    link, a FIFO, a socket, a device node (never a regular file or a folder)."""
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _mkdir_at(dir_fd: int, name: str) -> None:
    try:
        os.mkdir(name, 0o777, dir_fd=dir_fd)
    except FileExistsError:
        pass


def _split(path: str | os.PathLike, root: str | os.PathLike | None) -> tuple[str, list[str]]:
    """``root`` and the parts of ``path`` below it (string work: pathlib's costs more than the
    reads it guards when the Health tab lists 500 runs)."""
    path = os.fspath(path)
    if root is None:
        root, name = os.path.split(path)
        return root or ".", [name]
    root = os.fspath(root)
    prefix = root.rstrip(os.sep) + os.sep
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under {root}")
    return root, [p for p in path[len(prefix):].split(os.sep) if p]


def _open_folder(root: str, parts: list[str], create: bool) -> int:
    """A descriptor of ``root/parts…``: ``root`` as the caller named it, every part below it
    opened without following a symlink."""
    if create:
        os.makedirs(root, exist_ok=True)
    try:
        fd = os.open(root, _DIR | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no folder {root}") from None
    except OSError as e:
        raise StateFileError(f"cannot open the run folder: {e.strerror}") from e
    try:
        for i, part in enumerate(parts):
            child = _open_at(fd, part, _DIR, "/".join(parts[: i + 1]), create, folder=True)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: Path, flags: int = os.O_RDONLY, *, root: str | os.PathLike | None = None,
              create: bool = False) -> int:
    """A descriptor of the regular file ``path`` (below ``root``), opened without following any
    symlink below ``root``. FileNotFoundError when it is absent (and not ``create``)."""
    root, parts = _split(path, root)
    folder = _open_folder(root, parts[:-1], create)
    try:
        return _open_at(folder, parts[-1], flags | (os.O_CREAT if create else 0), "/".join(parts), create, False)
    finally:
        os.close(folder)


# --------------------------------------------------------------------------- snapshots


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, durable: bool = False,
                 root: str | os.PathLike | None = None) -> None:
    """Replace ``path`` with what ``write(f)`` writes into a binary file, all or nothing.

    ``durable``: also ``fsync`` the file and its folder, so the new content survives a power
    loss (checkpoints); status snapshots skip it, a newer one follows within a second.
    """
    root_, parts = _split(path, root)
    folder = _open_folder(root_, parts[:-1], create=True)
    name = parts[-1]
    tmp = f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            _unlink_at(folder, tmp)
            raise
        if durable:
            _fsync_quietly(folder)
    finally:
        os.close(folder)


def write_json_atomic(path: Path, data: Any, root: str | os.PathLike | None = None) -> None:
    """Replace ``path`` with ``data`` as JSON (dumps + one write: the streaming encoder is ~6x slower)."""
    body = json.dumps(data, separators=(",", ":"), default=json_default).encode("utf-8")
    atomic_write(path, lambda f: f.write(body), root=root)


def write_text_atomic(path: Path, text: str, root: str | os.PathLike | None = None) -> None:
    body = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(body), root=root)


def load_json(path: Path, root: str | os.PathLike | None = None) -> Any:
    """The JSON document in ``path``. FileNotFoundError when absent; StateFileError (saying why)
    when it is there but not a regular file, unreadable, too large, too deep or not JSON."""
    rel = os.path.basename(path)
    fd = open_file(path, root=root)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_SNAPSHOT_BYTES:
            raise StateFileError(f"{rel} is larger than {MAX_SNAPSHOT_BYTES >> 20} MiB")
        raw = _read_range(fd, 0, size)
    finally:
        os.close(fd)
    doc = parse_json(raw)
    if isinstance(doc, _Bad):
        raise StateFileError(f"{rel} {doc.why}")
    return doc


def read_json(path: Path, root: str | os.PathLike | None = None) -> Any | None:
    """The JSON in ``path``, or None when it is missing, unusable or not valid JSON."""
    try:
        return load_json(path, root)
    except OSError:
        return None


# --------------------------------------------------------------------------- records


def append_record(path: Path, record: dict, root: str | os.PathLike | None = None) -> None:
    """Append one JSON line. Safe with concurrent writers and after a writer crashed mid-line."""
    line = json.dumps({"v": FORMAT_VERSION, **record}, separators=(",", ":"), default=json_default)
    data = (line + "\n").encode("utf-8")
    fd = open_file(path, os.O_RDWR | os.O_APPEND, root=root, create=True)
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


class _Bad:
    """A line or document that is not usable JSON, and why."""

    def __init__(self, why: str):
        self.why = why


def parse_json(raw: bytes) -> Any:
    """``json.loads(raw)``, or a ``_Bad`` for text that is not JSON or nests too deeply (a
    reader's recursion, and every later ``json_safe``/``dumps`` pass, must stay bounded)."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        return _Bad("is nested too deeply")
    except ValueError as e:
        return _Bad(f"is not valid JSON ({str(e)[:80]})")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(doc) > MAX_JSON_DEPTH:
        return _Bad(f"is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return doc


def _depth(doc: Any) -> int:
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def as_record(raw: bytes | None) -> dict:
    """A line as a record; anything but a JSON object is ``{"_malformed": <text>}`` so a consumer
    can reject it without losing its place."""
    rec = parse_json(raw) if raw is not None else _Bad("too long")
    if isinstance(rec, dict):
        return rec
    text = "(a line over 1 MiB)" if raw is None else raw[:500].decode("utf-8", "replace")
    return {"_malformed": text}


def lines_in(fd: int, start: int, end: int) -> tuple[list[tuple[int, bytes | None]], int]:
    """``(offset, line)`` of each complete line in ``[start, end)`` (``None`` for one over
    MAX_LINE_BYTES: its bytes are skipped, not held), and the offset after the last one. Read
    in chunks; a trailing line without its newline is left for later (its writer may be busy)."""
    out: list[tuple[int, bytes | None]] = []
    line_at, pending, dropped, pos = start, b"", 0, start
    while pos < end:
        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
        if not chunk:
            break
        pos += len(chunk)
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            raw = pending + piece
            if raw.strip() or dropped:
                out.append((line_at, None if dropped or len(raw) > MAX_LINE_BYTES else raw))
            line_at += dropped + len(raw) + 1
            pending, dropped = b"", 0
        pending += pieces[-1]
        if len(pending) > MAX_LINE_BYTES:
            dropped, pending = dropped + len(pending), b""
    return out, line_at


def read_records(path: Path, offset: int = 0, root: str | os.PathLike | None = None) -> tuple[list[dict], int]:
    """Complete records from byte ``offset`` on, and the offset to continue from.

    A trailing line without its newline is not returned (its writer may still be writing), and
    the returned offset stops before it. Lines that are not JSON objects come back as
    ``{"_malformed": <text>}``. A missing file has no records; a file that is there but must not
    be read (a symlink, a FIFO) raises StateFileError.
    """
    pairs, offset = read_lines(path, offset, root)
    return [rec for _, rec in pairs], offset


def read_lines(path: Path, offset: int = 0, root: str | os.PathLike | None = None) -> tuple[list[tuple[int, dict]], int]:
    """Like :func:`read_records`, each record with the byte offset of its line."""
    offset = max(0, offset)
    try:
        fd = open_file(path, root=root)
    except FileNotFoundError:
        return [], offset
    try:
        lines, end = lines_in(fd, offset, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return [(at, as_record(raw)) for at, raw in lines], end


# --------------------------------------------------------------------------- small helpers


def file_size(path: Path) -> int:
    """Size of ``path`` (0 when missing), never looked at through a link: the cheap ``stat``."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_quietly(fd: int) -> None:
    """Make a rename durable where the platform can fsync a folder."""
    try:
        os.fsync(fd)
    except OSError:
        pass


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
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


def _read_range(fd: int, start: int, size: int) -> bytes:
    parts, pos = [], start
    while pos < size:
        chunk = os.pread(fd, min(CHUNK, size - pos), pos)
        if not chunk:
            break
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


__all__ = [
    "FORMAT_VERSION", "TEMP_SUFFIX", "MAX_SNAPSHOT_BYTES", "MAX_LINE_BYTES", "MAX_JSON_DEPTH", "StateFileError",
    "open_file", "atomic_write", "write_json_atomic", "write_text_atomic", "load_json", "read_json", "parse_json",
    "append_record", "read_records", "read_lines", "lines_in", "as_record", "CHUNK", "file_size", "unlink_quietly",
    "json_default",
]

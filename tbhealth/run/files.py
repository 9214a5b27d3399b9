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
  root is given), and only regular files are read, without blocking: every open goes through
  :mod:`tbhealth.run.safeopen`; a file that must not be used raises :class:`StateFileError`.

Nothing here imports torch: the TensorBoard plugin uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tbhealth.run.safeopen import StateFileError, open_existing, open_file, open_folder, split_below

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


# --------------------------------------------------------------------------- snapshots


@contextlib.contextmanager
def _folder_of(path: str | os.PathLike, root: str | os.PathLike | None) -> Iterator[tuple[int, str, str]]:
    """``(folder fd, name, temp name)`` for replacing ``path``: its folder opened (and created)
    without following a symlink below ``root``, so every later step works on that folder."""
    root_, parts = split_below(path, root)
    folder = open_folder(root_, parts[:-1], create=True)
    try:
        yield folder, parts[-1], f".{parts[-1]}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    finally:
        os.close(folder)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, durable: bool = False,
                 root: str | os.PathLike | None = None) -> None:
    """Replace ``path`` with what ``write(f)`` writes into a binary file, all or nothing.

    ``durable``: also ``fsync`` the file and its folder, so the new content survives a power
    loss (checkpoints); status snapshots skip it, a newer one follows within a second.
    """
    with _folder_of(path, root) as (folder, name, tmp):
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temp file name for a writer that only takes a name (Lightning's ``save_checkpoint``);
    when the block ends without an exception and the writer wrote it, it is ``fsync``-ed and
    renamed over ``path`` and the folder ``fsync``-ed. Nothing is renamed when it wrote nothing
    (under DDP only rank 0 writes); an exception leaves no temp file behind.

    The name handed out goes through ``/proc/self/fd`` (Linux) to the folder opened here, so the
    writer cannot be sent elsewhere by a folder swapped for a symlink after the check.
    """
    with _folder_of(path, root) as (folder, name, tmp):
        pinned = Path(f"/proc/self/fd/{folder}")
        try:
            yield (pinned if pinned.is_dir() else Path(path).parent) / tmp
            try:
                fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            except FileNotFoundError:
                return  # the writer wrote nothing
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            _fsync_quietly(folder)
        finally:
            _unlink_at(folder, tmp)


def link_atomic(source: Path, target: Path, root: str | os.PathLike | None = None) -> None:
    """Make ``target`` another name of ``source``'s file (same folder), atomically and durably;
    a copy where the file system has no hard links. A kill leaves ``target`` as it was."""
    with _folder_of(target, root) as (folder, name, tmp):
        try:
            os.link(Path(source).name, tmp, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        except OSError:  # no hard links here (some network and FUSE file systems): copy
            src = open_file(Path(source), root=root)
            with os.fdopen(src, "rb") as f:
                atomic_write(target, lambda out: shutil.copyfileobj(f, out, 1 << 20), durable=True, root=root)
            return
        try:
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        finally:
            _unlink_at(folder, tmp)  # gone once renamed; still there only if the rename failed
        _fsync_quietly(folder)


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
        raw = b"".join(chunks(fd, 0, size))
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
    line_at, pending, dropped = start, b"", 0
    for chunk in chunks(fd, start, end):
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
    fd = open_existing(path, root)
    if fd is None:
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


def chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    """``[start, end)`` of ``fd`` in consecutive reads of at most CHUNK bytes (fewer at EOF)."""
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
        if not chunk:
            return
        yield chunk
        pos += len(chunk)


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
    "FORMAT_VERSION", "TEMP_SUFFIX", "MAX_SNAPSHOT_BYTES", "MAX_LINE_BYTES", "MAX_JSON_DEPTH", "StateFileError",
    "open_file", "atomic_write", "write_json_atomic", "write_text_atomic", "load_json", "read_json", "parse_json",
    "append_record", "read_records", "read_lines", "lines_in", "as_record", "CHUNK", "chunks", "open_existing",
    "file_size", "unlink_quietly", "json_default",
]

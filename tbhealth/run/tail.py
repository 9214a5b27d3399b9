"""Reading a growing record file from its end, and following it across truncation and replacement.

Two readers need more than "the records after this offset" (:func:`tbhealth.run.files.read_records`):
the Health tab's first look at a long log wants only its newest records, without parsing 40 MB to
find them; and whoever waits on ``control.jsonl`` or ``acks.jsonl`` must not lose requests when
another process truncates or replaces the file under its offset. Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from tbhealth.run.files import MAX_LINE_BYTES, as_record, chunks, lines_in
from tbhealth.run.safeopen import open_existing, open_file

_TAIL_BLOCK = 64 << 10
_TAIL_MAX = 64 << 20  # most bytes a tail read goes back: a hostile giant last line costs no more
_HEAD = 128  # bytes of a followed file's start remembered: more than its first request's id


def read_tail(path: Path, max_records: int, start: int = 0,
              root: str | os.PathLike | None = None) -> tuple[list[dict], int, int]:
    """The last ``max_records`` records after byte ``start``, the offset after them, and how many
    lines before them were left out.

    Read backwards from the end in blocks, so a first look at a 40 MB log costs its tail, not a
    parse of 40 MB; the lines left out are only counted (``bytes.count`` over 1 MiB reads).
    """
    start = max(0, start)
    fd = open_existing(path, root)
    if fd is None:
        return [], start, 0
    try:
        size = os.fstat(fd).st_size
        stop = _last_line_end(fd, start, size)
        pos, blocks, newlines = stop, [], 0
        while pos > start and newlines <= max_records and stop - pos < _TAIL_MAX:
            n = min(_TAIL_BLOCK, pos - start)
            pos -= n
            blocks.append(os.pread(fd, n, pos))
            newlines += blocks[-1].count(b"\n")
        lines, _ = _lines_of(b"".join(reversed(blocks)), pos, whole=pos == start)
        kept = lines[-max_records:] if max_records > 0 else []
        first = kept[0][0] if kept else stop
        skipped = _count_newlines(fd, start, first)
    finally:
        os.close(fd)
    return [as_record(raw) for _, raw in kept], stop, skipped


def _lines_of(data: bytes, base: int, whole: bool) -> tuple[list[tuple[int, bytes | None]], int]:
    """``(offset, line)`` of the complete lines of ``data`` (which starts at file offset ``base``
    and ends after a newline); without ``whole`` its first piece is the end of an earlier line."""
    out, at = [], base
    pieces = data.split(b"\n")[:-1]
    for i, raw in enumerate(pieces):
        if (whole or i > 0) and raw.strip():
            out.append((at, raw if len(raw) <= MAX_LINE_BYTES else None))
        at += len(raw) + 1
    return out, at


def _last_line_end(fd: int, start: int, size: int) -> int:
    """The offset just after the last newline in ``[start, size)``, or ``start`` when none."""
    pos = size
    while pos > start:
        n = min(_TAIL_BLOCK, pos - start)
        block = os.pread(fd, n, pos - n)
        i = block.rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    return start


def _count_newlines(fd: int, start: int, end: int) -> int:
    return sum(chunk.count(b"\n") for chunk in chunks(fd, start, end))


class Follower:
    """Hands out the records appended to one file, each once, even when another process
    truncates it (``: > control.jsonl``) or replaces it (an editor, ``mv``).

    A plain byte offset would then point past the end, or into the middle of other lines, and
    requests would vanish. Each read checks the file is the one read before (device and inode,
    its first bytes), no shorter than the offset, and that the offset still follows a newline; if
    not, it starts over from 0 (the caller drops records it has already seen by their ids).
    """

    def __init__(self, path: Path, root: str | os.PathLike | None = None):
        self.path, self.root = Path(path), root
        self.offset = 0
        self._file: tuple[int, int] | None = None
        self._head = b""  # the file's first bytes when it was first read: a rewrite changes them
        self._seen: tuple | None = None

    def changed(self) -> bool:
        """Whether the file may hold something new since the last read: one ``lstat``."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._seen

    def read(self) -> list[tuple[int, dict]]:
        """New ``(line offset, record)`` pairs; [] when the file is absent. StateFileError when it
        must not be read (it is then looked at again only once it changes)."""
        try:
            st = os.lstat(self.path)
            self._seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            fd = open_file(self.path, root=self.root)
        except FileNotFoundError:
            return []
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._file or not self._continues(fd, st.st_size):
                self.offset, self._head = 0, b""
            self._file = (st.st_dev, st.st_ino)
            lines, self.offset = lines_in(fd, self.offset, st.st_size)
            if self.offset and not self._head:
                self._head = os.pread(fd, min(_HEAD, self.offset), 0)
        finally:
            os.close(fd)
        return [(at, as_record(raw)) for at, raw in lines]

    def _continues(self, fd: int, size: int) -> bool:
        """Whether the open file is the one read so far, grown: no shorter than the offset, the
        offset right after a newline, the same first bytes (a truncated file rewritten past the
        old offset fails one of these)."""
        if not self.offset:
            return True
        if size < self.offset or os.pread(fd, 1, self.offset - 1) != b"\n":
            return False
        return os.pread(fd, len(self._head), 0) == self._head


__all__ = ["read_tail", "Follower"]

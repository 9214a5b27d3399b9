"""Opening a run's files and folders without following a symlink below the run directory.

A run directory is written by other processes (the CLI, the Health tab, any tool, anyone with
write access to the logdir), so a link planted at ``log.jsonl`` or at ``plugins/tbhealth`` could
send a write or a read anywhere. Every folder below ``root`` and the file itself are opened
relative to the one above with ``O_NOFOLLOW`` (``openat``), so what is opened is what sits there.
A writer (``create``) replaces a link, FIFO, socket or device node where its file or folder
belongs (the link's target is never touched); a reader gets a :class:`StateFileError` saying what
it found. Files are opened ``O_NONBLOCK`` and must be regular files, so a FIFO cannot block a
reader. ``root`` itself (the run directory, as the caller named it) is trusted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR = os.O_RDONLY | os.O_DIRECTORY


class StateFileError(OSError):
    """A run-state file (or a folder on its way) that exists but must not be used: a symlink, a
    FIFO, a folder, unreadable, too large, not JSON. ``str()`` names the file and says why."""


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link (tbhealth never follows links inside a run)"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISREG, "a regular file")):
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


def split_below(path: str | os.PathLike, root: str | os.PathLike | None) -> tuple[str, list[str]]:
    """``root`` and the parts of ``path`` below it (string work: pathlib's costs more than the
    reads it guards when the Health tab lists 500 runs)."""
    path = os.fspath(path)
    if root is None:
        root, name = os.path.split(path)
        return root or ".", [name]
    root, path = os.path.normpath(os.fspath(root)), os.path.normpath(path)  # "./x" is "x": `status .` works
    prefix = "" if root == "." else root.rstrip(os.sep) + os.sep
    if not path.startswith(prefix) or path.startswith(".." + os.sep) or path == "..":
        raise ValueError(f"{path} is not under {root}")
    return root, [p for p in path[len(prefix):].split(os.sep) if p]


def open_folder(root: str, parts: list[str], create: bool) -> int:
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
    root, parts = split_below(path, root)
    folder = open_folder(root, parts[:-1], create)
    try:
        return _open_at(folder, parts[-1], flags | (os.O_CREAT if create else 0), "/".join(parts), create, False)
    finally:
        os.close(folder)


def open_existing(path: Path, root: str | os.PathLike | None = None) -> int | None:
    """:func:`open_file` for reading, or None when the file is absent."""
    try:
        return open_file(path, root=root)
    except FileNotFoundError:
        return None


__all__ = ["StateFileError", "open_file", "open_existing", "open_folder", "split_below"]

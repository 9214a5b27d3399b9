"""Run names and where runs live: TensorBoard's naming, validated so no name leaves the logdir.

A run name is TensorBoard's: the run directory's path relative to the logdir, ``/``-separated,
``.`` for the logdir itself. Any name that comes from a user, a URL or a file goes through
:func:`resolve_run` before it becomes a path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tbhealth.run.rundir import CHECKPOINT_SUBDIR, STATE_SUBDIR

_RUN_PART = re.compile(r"^[A-Za-z0-9_.@+=-]{1,255}$")
#: A name for a new run (``--name``, the config's ``name:``): one plain folder name, not hidden,
#: not an option, with room for the ``-2`` suffix of :func:`unique_run_dir` below 255 bytes.
NEW_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
NEW_RUN_NAME_RULE = ("a plain name of at most 200 letters, digits and _.- "
                     "(no '/', spaces, leading '.' or '-')")


class RunNameError(ValueError):
    """A run name that would leave the logdir or is not a plain relative path."""


def resolve_run(logdir: str | os.PathLike, run: str) -> Path:
    """The directory of ``run`` under ``logdir``; RunNameError for anything that could escape it.

    A run name is TensorBoard's: the path relative to the logdir, ``/``-separated, ``.`` for the
    logdir itself. Absolute paths, ``..``, empty parts, backslashes, control characters and
    symlinks that lead outside are refused.
    """
    if not isinstance(run, str) or not run or len(run) > 512:
        raise RunNameError("run name must be a non-empty string of at most 512 characters")
    if run == ".":
        return Path(logdir).resolve()
    parts = run.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _RUN_PART.match(part):
            raise RunNameError(
                f"invalid run name {run[:80]!r}: use letters, digits and _.@+=- separated by '/', "
                "at most 255 per part"
            )
    try:
        base = Path(logdir).resolve()
        target = (base / Path(*parts)).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a path the system refuses
        raise RunNameError(f"run {run[:80]!r} cannot be looked up: {e}") from None
    if target != base and base not in target.parents:
        raise RunNameError(f"run {run!r} resolves outside the logdir")
    return target


def check_new_run_name(name: str) -> str:
    """``name`` if it may name a new run, else RunNameError saying the rule."""
    if not isinstance(name, str) or not NEW_RUN_NAME.match(name):
        raise RunNameError(f"{str(name)[:80]!r} is not a valid run name: use {NEW_RUN_NAME_RULE}")
    return name


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
        if _holds_run(d):
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


def _holds_run(d: Path) -> bool:
    """Whether ``d`` has a status file, of any kind (reading it tells what is wrong with it).

    A folder we may not look into is listed too: it may hold a run, and its readers then report
    "permission denied" rather than the run silently vanishing from the overview.
    """
    try:
        os.lstat(d / STATE_SUBDIR / "status.json")
        return True
    except PermissionError:
        return True
    except OSError:
        return False


__all__ = ["RunNameError", "NEW_RUN_NAME", "NEW_RUN_NAME_RULE", "resolve_run", "check_new_run_name", "run_name",
           "unique_run_dir", "list_run_dirs"]

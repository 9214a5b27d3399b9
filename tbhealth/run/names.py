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

_RUN_PART = re.compile(r"^[A-Za-z0-9_.@+=-]+$")


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


__all__ = ["RunNameError", "resolve_run", "run_name", "unique_run_dir", "list_run_dirs"]

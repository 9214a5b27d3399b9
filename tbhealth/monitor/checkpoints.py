"""The checkpoint hook: how the monitor asks the training loop to write a checkpoint.

The loop owns its checkpoints (what goes in them, where, how); the monitor only decides when:
at a step boundary, for a ``manual`` request, before a ``stop``, or when the loop calls
``Monitor.save_checkpoint``. The hook gets the monitor's own state to store with it, so a
resumed run can hand it back (``Monitor.load_state_dict``) and nobody reads the monitor's
internals. A loop's function may take ``(kind, state)`` or just ``(kind)``.

A function may also return a ``concurrent.futures.Future`` of the file instead of the file: the
write then goes on in the background (or in the framework that owns checkpoints) and the
monitor acknowledges a ``checkpoint`` request only once the future says the file is on disk; a
stop waits for it before the loop is told to leave.

Whatever writes the file, it should never leave half of one behind (a kill, a full disk):
:func:`save_atomic` (``torch.save``) and :func:`tbhealth.run.files.atomic_path` (for a writer
that takes a path, such as Lightning's ``trainer.save_checkpoint``) write a temp file, ``fsync``
it and rename it into place, following no symlink below the run directory. :func:`plain` makes the
monitor's state JSON-safe for frameworks that keep it in a JSON file.
"""

from __future__ import annotations

import inspect
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Union

import torch

from tbhealth.monitor.progress import Progress
from tbhealth.run.files import atomic_write

#: What a checkpoint function returns: the file written, or a future of it (a write in flight).
Written = Union[Path, "Future[Path]"]


class CheckpointHook:
    """Calls ``fn(kind, state)`` (or ``fn(kind)``) and records the file as the run's last one."""

    def __init__(self, fn: Callable[..., Path] | None, state: Callable[[], dict], progress: Progress):
        self._fn, self._state, self._progress = fn, state, progress
        self._takes_state = takes_state(fn)

    def __call__(self, kind: str) -> Written | None:
        """The file written (or a future of it), or None when the loop registered no function."""
        if self._fn is None:
            return None
        # the state (a read-back mid-epoch) is only built for a function that stores it
        result = self._fn(kind, self._state()) if self._takes_state else self._fn(kind)
        if isinstance(result, Future):
            result.add_done_callback(self._note)
            return result
        path = Path(result)
        self._progress.last_checkpoint = path.name
        return path

    def _note(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._progress.last_checkpoint = Path(future.result()).name


def takes_state(fn: Callable | None) -> bool:
    """Whether ``fn`` takes ``(kind, state)``; ``fn(kind)`` is the short form."""
    try:
        params = inspect.signature(fn).parameters.values() if fn is not None else ()
    except (TypeError, ValueError):  # a builtin without a signature: the short form
        return False
    positional = [q for q in params if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(q.kind == q.VAR_POSITIONAL for q in params)


def save_atomic(obj: Any, path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``torch.save(obj)`` into a temp file next to ``path``, ``fsync``, rename over ``path``: a
    reader (or a resume after a crash) finds the old file or the new one, never half of one. No
    symlink below ``root`` (the run directory) is followed."""
    path = Path(path)
    atomic_write(path, lambda f: torch.save(obj, f), durable=True, root=root)
    return path


def plain(value: Any) -> Any:
    """``value`` with tensors as numbers (or lists), tuples as lists and paths as strings: what
    ``json.dumps`` takes and gives back unchanged (Hugging Face keeps callback state in
    ``trainer_state.json``). NaN stays a float NaN, as Python's ``json`` writes it."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value

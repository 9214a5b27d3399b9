"""What the Monitor's constructor decides before anything exists: whether its arguments make
sense, which folder the run lives in (a new one, or the one a resumed state continues) and
which device the model is on. Bad arguments fail here, before a thread, a file or a folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tbhealth.run.names import unique_run_dir

#: What a stopped run's messages say about continuing it, unless the loop says better (``resume_hint``).
RESUME_HINT = ("continue it by running your loop again with `Monitor(..., resume_state=state)`, `state` being "
               "the monitor state its last checkpoint stored")
#: ``handle_signals`` values: install the monitor's handlers, also call the ones found before, or neither.
SIGNAL_MODES = (True, "chain", False)


def check_arguments(*, total_epochs: int | None, total_steps: int | None, heartbeat_s: float,
                    handle_signals: bool | str) -> None:
    """ValueError naming the argument, the value and what is allowed."""
    for key, value in (("total_epochs", total_epochs), ("total_steps", total_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a whole number >= 1 (or None), got {value!r}")
    if not heartbeat_s > 0:
        raise ValueError(f"heartbeat_s must be > 0 seconds (and well under 10), got {heartbeat_s}")
    if handle_signals not in SIGNAL_MODES:
        raise ValueError(f"handle_signals must be True, 'chain' or False, got {handle_signals!r}")


def run_folder(logdir: str | os.PathLike, name: str | None, run_dir: str | os.PathLike | None,
               resume_state: dict | None) -> Path:
    """``run_dir`` if given; else the folder ``resume_state`` continues, when it still exists
    (a run moved elsewhere: pass ``run_dir``); else a new ``logdir/name`` (made unique)."""
    saved = (resume_state or {}).get("run_dir")
    if run_dir is None and saved and Path(saved).is_dir():
        run_dir = saved
    if run_dir is None:
        run_dir = unique_run_dir(logdir, name or time.strftime("run-%Y%m%d-%H%M%S"))
    return Path(run_dir)


def device_of(model: torch.nn.Module | None) -> torch.device | None:
    """Where the model's parameters live (the status shows it); None without a model."""
    try:
        return next(model.parameters()).device if model is not None else None
    except StopIteration:
        return None

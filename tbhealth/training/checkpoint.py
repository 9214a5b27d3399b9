"""Checkpoint files: atomic saves, rotation and finding the one to resume from.

A checkpoint is written to a temp file in the same folder and renamed over the target, so a
crash or a kill during ``torch.save`` never leaves a truncated ``last.pt``: resuming always finds
either the old file or the new one. The trainer writes them off its training thread
(:mod:`tbhealth.training.checkpoint_writer`); a kill during a write leaves only a temp file, which
:func:`remove_stale_temps` deletes at the next resume. Before a resume uses one, :func:`check_resume`
makes sure the config still fits it (same model tensors, same optimizer), so a changed config is an
error that says what changed rather than a raw size-mismatch, or a crash that marks the run failed.

Names inside ``<run>/checkpoints/``:
``last.pt`` (end of every epoch and on stop), ``epoch-0005.pt`` (every ``every_epochs``, newest
``keep_last`` kept), ``best.pt`` (best monitored metric), ``manual-step-000123.pt`` (requested
from the CLI or the Health tab; never rotated away).

Each checkpoint the trainer writes says its layout in ``format`` (:data:`FORMAT_VERSION`);
:func:`load` refuses another one with a message naming the file and both versions, rather than
failing later on a missing key.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbhealth.monitor.checkpoints import save_atomic
from tbhealth.run.files import TEMP_SUFFIX, unlink_quietly
from tbhealth.run.rundir import RunDir
from tbhealth.training.config import Config, ConfigError, Problem

RESUMABLE_PREFIXES = ("last", "epoch-", "manual-")
#: The temp file of an atomic write (tbhealth.run.files): ``.<target name>.<8 hex digits>.tmp``.
_TEMP_FILE = re.compile(r"\..+\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
#: The layout of the dict the trainer saves; raise it when a key changes meaning or goes away.
FORMAT_VERSION = 1


#: Mismatched tensors listed by name before the rest are counted.
_SHOWN = 5


class CheckpointFormatError(ValueError):
    """A checkpoint this version of tbhealth cannot resume from."""


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A trainer checkpoint, after checking its ``format``; :class:`CheckpointFormatError` if
    it is not one this version writes."""
    # weights_only=False: our own files carry optimizer state, RNG states and the config dict.
    state = torch.load(path, map_location=map_location, weights_only=False)
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT_VERSION:
        what = f"format {found!r}" if found is not None else "no format version (not a tbhealth trainer checkpoint?)"
        raise CheckpointFormatError(
            f"{path}: checkpoint has {what}; this tbhealth reads format {FORMAT_VERSION}. "
            "Resume it with the tbhealth version that wrote it, or start the run again without --resume.")
    return state


def remove_stale_temps(*folders: Path) -> list[str]:
    """Delete the temp files of atomic writes that a killed process left in ``folders`` (a
    ``kill -9`` during ``torch.save`` leaves one the size of a checkpoint); their names. Call it
    only when nothing else writes there: at a resume, before training."""
    removed = []
    for folder in folders:
        for path in Path(folder).glob(".*" + TEMP_SUFFIX):  # a missing folder has none
            if _TEMP_FILE.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                unlink_quietly(path)
                removed.append(path.name)
    return removed


def check_resume(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """ConfigError when the checkpoint cannot continue under ``cfg``: the model's tensors differ
    (the model or the data's shape changed), or the optimizer or scheduler is another one."""
    problems = _model_problems(saved.get("model"), model)
    before = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    for section, now in (("optimizer", cfg.optimizer.name), ("scheduler", cfg.scheduler.name)):
        then = (before.get(section) or {}).get("name")
        if then is not None and then != now and (section == "optimizer" or saved.get(section)):
            problems.append(Problem(f"{section}.name", f"is {now!r} but the run was started with {then!r}: its saved "
                                                       f"{section} state belongs to {then!r}"))
    groups = saved.get("optimizer", {}).get("param_groups") if isinstance(saved.get("optimizer"), dict) else None
    if not problems and isinstance(groups, list) and len(groups) != len(optimizer.param_groups):
        problems.append(Problem("optimizer", f"has {len(optimizer.param_groups)} parameter group(s), the checkpoint "
                                             f"{len(groups)}"))
    if problems:
        raise ConfigError(problems, source="for --resume: it no longer fits the run's checkpoint. Resume with the "
                                           "settings the run was started with (its config.yaml), or start a new run "
                                           "without --resume")


def _model_problems(state: object, model: torch.nn.Module) -> list[Problem]:
    if not isinstance(state, dict):
        return [Problem("model", "the checkpoint holds no model weights")]
    now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    then = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    diffs = [f"{k} is {list(then[k])} in the checkpoint, {list(now[k])} now" for k in now if k in then and then[k] != now[k]]
    diffs += [f"{k} is new" for k in now if k not in then]
    diffs += [f"{k} is gone" for k in then if k not in now]
    if not diffs:
        return []
    more = f" (and {len(diffs) - _SHOWN} more)" if len(diffs) > _SHOWN else ""
    return [Problem("model", "does not match the checkpoint (the model or the data's shape changed): "
                             + "; ".join(diffs[:_SHOWN]) + more)]


def rng_state() -> dict:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Where checkpoints go and which ones are kept."""

    def __init__(self, run: RunDir, keep_last: int = 3):
        self.run = run
        self.dir = run.checkpoint_dir
        self.keep_last = keep_last

    def path_for(self, kind: str, *, epoch: int = 0, step: int = 0) -> Path:
        name = {
            "last": "last.pt",
            "best": "best.pt",
            "epoch": f"epoch-{epoch:04d}.pt",
            "manual": f"manual-step-{step:06d}.pt",
        }[kind]
        return self.dir / name

    def save(self, state: dict, kind: str, *, epoch: int = 0, step: int = 0) -> Path:
        """Write ``state`` as ``kind`` (last, epoch, best, manual) and rotate epoch files."""
        path = save_atomic(state, self.path_for(kind, epoch=epoch, step=step), root=self.run.path)
        if kind == "epoch":
            self.rotate()
        return path

    def rotate(self) -> None:
        """Keep the newest ``keep_last`` periodic (``epoch-N``) checkpoints; delete the older ones."""
        epochs = sorted(self.dir.glob("epoch-*.pt"))
        for old in epochs[: max(0, len(epochs) - self.keep_last)]:
            old.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        """The newest checkpoint that holds a training state to continue from."""
        files = [p for p in self.run.list_checkpoints() if p.name.startswith(RESUMABLE_PREFIXES)]
        return files[-1] if files else None

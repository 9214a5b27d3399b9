"""What both framework callbacks need: lazy imports, one optimizer step's micro-batches, the
process group as a :class:`~tbhealth.distributed.DistContext`, and the run folder every
process agrees on."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from tbhealth.distributed import DistContext
from tbhealth.monitor.setup import run_folder


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """Import an optional framework, or fail with the one command that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{needed_by} needs `{module.split('.')[0]}`, which is not installed: "
            f"pip install 'tbhealth[{extra}]'") from e


def finish_stopped_epoch(mon: Any, epoch: int, per_epoch: int | None, end: Callable[[], None]) -> None:
    """Before ``epoch`` begins: a run stopped on its epoch's *last* step resumes into the next
    epoch (the framework counts that epoch's batches as done) and would never end the stopped one,
    leaving a hole in every epoch curve. End it first with ``end()``, from its restored sums (and
    whatever validation the framework ran on resuming)."""
    if mon.epochs_done < mon.progress.epoch < epoch:
        mon.start_epoch(mon.progress.epoch, per_epoch)
        if not mon.should_stop:
            end()


class MicroBatches:
    """The micro-batches of one optimizer step (gradient accumulation), summed on the device.

    ``add`` costs one or two tensor adds and no host-device sync: the monitor reads the sums back
    on its logging steps only. ``n`` counts predictions (samples), the weight of the step's mean
    loss in the epoch's mean and the denominator of its accuracy.
    """

    def __init__(self) -> None:
        self._loss: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None
        self._micro = 0
        self.n = 0

    def add(self, loss: torch.Tensor, n: int, correct: torch.Tensor | None = None) -> None:
        loss = loss.detach().float().reshape(())
        self._loss = loss if self._loss is None else self._loss + loss
        if correct is not None:
            correct = correct.detach().reshape(())
            self._correct = correct if self._correct is None else self._correct + correct
        self._micro += 1
        self.n += n

    def __bool__(self) -> bool:
        return self._micro > 0

    def take(self) -> dict[str, Any]:
        """The step's loss summed and averaged over its micro-batches, its predictions and right
        predictions; empties the window."""
        step = {"loss": self._loss / self._micro, "loss_sum": self._loss, "n": self.n, "correct": self._correct}
        self.__init__()
        return step


def batch_size(batch: Any) -> int:
    """The number of samples in a batch as data loaders yield them: a tensor, a tuple/list whose
    first item is one, or a dict of them (the first tensor value). 1 when nothing tells."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return batch_size(first) if first is not None else 1
    return 1


def dist_context(device: torch.device) -> DistContext | None:
    """The process group the framework already started, as the monitor's DistContext (or None
    for a single process). Control decisions travel over Gloo even when training uses NCCL."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device, group)


def agreed_run_dir(base: str | os.PathLike, name: str, saved: dict | None, *, lead: bool,
                   broadcast: Callable[[Any], Any]) -> Path:
    """The run folder of every process: rank 0 picks it (the folder a resumed monitor state names,
    else a new ``base/name`` made unique) and ``broadcast`` hands its choice to the others."""
    path = str(run_folder(base, name, None, saved)) if lead else None
    return Path(broadcast(path))

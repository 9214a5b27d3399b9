"""The epoch's train-loss and correct-prediction sums, kept on the device.

``step()`` may not read anything back (that is a host-device sync), so each step's loss tensor
is only appended to a list; a handful of kernels fold the list into running sums on logging
steps (or when :data:`MAX_PENDING` steps piled up). The epoch's means are read back once, at
its end. A checkpoint taken mid-epoch reads the sums so far, and a run resumed from it adds
them to the steps it trains, so the resumed epoch's means cover the whole epoch.
"""

from __future__ import annotations

from typing import Any

import torch

from tbhealth.distributed import DistContext
from tbhealth.instruments.window import StepWindow

#: Steps whose loss waits for a logging step before it is summed (bounds the list's memory).
MAX_PENDING = 256


class EpochSums:
    """Device-side sums of the epoch in progress; see the module docstring."""

    def __init__(self, dist: DistContext | None = None, window: StepWindow | None = None):
        """``window``: also hands every folded step's loss to the health engine's logging window."""
        self._dist, self._window = dist, window
        self._pending: list[tuple[torch.Tensor, int, torch.Tensor | None]] = []
        self._loss: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None
        self._count = 0
        self._resumed: list | None = None  # [loss sum, correct sum | None, count] before a resume
        self.counted = 0.0  # predictions the last means() averaged over (all ranks): the accuracy's n

    def start(self, *, keep_resumed: bool = False) -> None:
        """A new epoch; ``keep_resumed``: it is the one a mid-epoch checkpoint interrupted."""
        self._pending, self._loss, self._correct, self._count = [], None, None, 0
        if not keep_resumed:
            self._resumed = None

    def resume(self, sums: list | None) -> None:
        """The sums a mid-epoch checkpoint kept (:meth:`snapshot`), to add to this session's."""
        self._resumed = list(sums) if sums else None

    def add(self, loss: torch.Tensor, n: int, correct: torch.Tensor | None) -> None:
        """One step (training thread): a list append; nothing runs on the device."""
        self._pending.append((loss, n, correct))
        self._count += n
        if len(self._pending) >= MAX_PENDING:
            self.fold()

    def fold(self) -> torch.Tensor | None:
        """Add the steps reported since the last fold to the sums, on the device; returns the
        running loss sum (a tensor: nothing is read back here)."""
        pending, self._pending = self._pending, []
        if pending and self._window is not None:
            self._window.absorb([loss for loss, _, _ in pending])
        if pending:
            by_n: dict[int, list[torch.Tensor]] = {}
            for loss, n, _ in pending:
                by_n.setdefault(n, []).append(loss.reshape(()))
            total = sum(torch.stack(ls).float().sum() * n for n, ls in by_n.items())
            self._loss = total if self._loss is None else self._loss + total
            correct = [c.reshape(()) for _, _, c in pending if c is not None]
            if correct:
                c = torch.stack(correct).sum()
                self._correct = c if self._correct is None else self._correct + c
        return self._loss

    @property
    def empty(self) -> bool:
        """Nothing reported this epoch (nor before a resume into it)."""
        return self._loss is None and not self._pending and not self._resumed

    def fill_in(self, loss: Any, acc: Any) -> tuple[Any, Any, float | None]:
        """``(train loss, train accuracy, predictions counted)``: what the loop gave, and where it
        gave no loss the epoch's means (one read-back); the count only for an accuracy from here."""
        if loss is not None or self.empty:
            return loss, acc, None
        loss, mean_acc = self.means()
        return (loss, mean_acc, self.counted) if acc is None else (loss, acc, None)

    def means(self) -> tuple[float, float | None]:
        """The epoch's mean train loss and accuracy (over all ranks under DDP): one read-back."""
        self.fold()
        device = self._loss.device if self._loss is not None else "cpu"
        zero = torch.zeros((), device=device)
        loss = self._loss if self._loss is not None else zero
        correct = self._correct if self._correct is not None else zero
        sums = torch.stack([loss.double(), correct.double(),
                            torch.tensor(float(self._count), dtype=torch.float64, device=device)])
        if self._dist is not None:
            self._dist.all_reduce_sum(sums)
        loss_sum, n_correct, count = sums.tolist()
        has_correct = self._correct is not None
        if self._resumed:  # the part of this epoch trained before a mid-epoch resume
            r_loss, r_correct, r_count = self._resumed
            loss_sum, count = loss_sum + r_loss, count + r_count
            if r_correct is not None:
                n_correct, has_correct = n_correct + r_correct, True
        self.counted = count
        count = max(count, 1.0)
        return loss_sum / count, (n_correct / count if has_correct else None)

    def snapshot(self) -> list | None:
        """``[loss sum, correct sum | None, count]`` so far, read back for a mid-epoch checkpoint.

        Under DDP each rank's sums live apart and are not gathered here (a checkpoint must not
        cost a collective): the resumed epoch then averages the steps after the resume.
        """
        if self._dist is not None:
            return None
        self.fold()
        loss, correct, count = self._resumed or (0.0, None, 0)
        if self._loss is not None:
            loss += self._loss.item()
        if self._correct is not None:
            correct = (correct or 0.0) + float(self._correct.item())
        return [loss, correct, count + self._count]

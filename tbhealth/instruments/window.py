"""Device-side aggregates over every step of a logging window: no step goes unseen, none syncs.

The loss rules used to judge the one step that logs (every 50th by default): a blow-up on step 6
that settled by step 50, or a NaN on a step in between, went unseen. :class:`StepWindow` keeps,
for every step since the last logging step, the largest loss, whether any loss was NaN/Inf, and
the largest gradient norm the loop reported (the pre-clip norm from ``clip_grad_norm_``), as
tensors on the device.

It costs a step nothing it did not already pay: the losses are the ones the epoch's sums list
anyway, handed over when that list is folded (:meth:`absorb`, on logging steps); a reported norm
is one list append (:meth:`note_norm`). :meth:`take` hands the results to the one read-back the
logging step does anyway; :meth:`peek` does so without closing the window (the densely observed
first steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Reported norms that wait for a logging step before they are reduced (bounds the list's memory).
MAX_PENDING = 256


class StepWindow:
    """Largest loss, any non-finite loss and largest reported grad norm since the last :meth:`take`."""

    def __init__(self) -> None:
        self._losses: list[Tensor] | None = None  # [max loss, any bad (0/1)] so far, on the device
        self._norms: list[Tensor] = []
        self._norm_max: Tensor | None = None
        self._steps = 0  # losses absorbed since the window opened

    def absorb(self, losses: list[Tensor]) -> None:
        """The losses of the steps since the last fold (the epoch sums' list), reduced on the
        device: a few kernels per fold, nothing per step."""
        if not losses:
            return
        x = torch.stack([v.reshape(()) for v in losses]).float()
        parts = [x.max(), (~torch.isfinite(x)).any().float()]
        if self._losses is not None:  # torch.maximum propagates NaN, as a window max must
            parts = [torch.maximum(a, b) for a, b in zip(self._losses, parts)]
        self._losses = parts
        self._steps += len(losses)

    def note_norm(self, norm: Tensor) -> None:
        """One step's reported gradient norm (training thread): an append."""
        self._norms.append(norm)
        if len(self._norms) >= MAX_PENDING:
            self._fold_norms()

    def peek(self, step: int) -> tuple[int | None, Tensor | None]:
        """``(first step, tensor [max loss, any non-finite (0/1), max grad norm or -1])`` of the
        window so far, which ends at ``step``, on the device; ``(None, None)`` when it is empty.
        The window goes on: a single good step must not look like a whole good window."""
        if self._losses is None:
            return None, None
        self._fold_norms()
        device = self._losses[0].device
        norm = self._norm_max.to(device) if self._norm_max is not None else torch.full((), -1.0, device=device)
        return step - self._steps + 1, torch.stack([*self._losses, norm])

    def take(self, step: int) -> tuple[int | None, Tensor | None]:
        """:meth:`peek`, then start the next window (a logging step, or an epoch's end)."""
        out = self.peek(step)
        self._losses, self._norm_max, self._steps = None, None, 0
        return out

    @property
    def empty(self) -> bool:
        return self._losses is None

    def _fold_norms(self) -> None:
        norms, self._norms = self._norms, []
        if norms:
            g = torch.stack([v.detach().reshape(()).float().to(norms[0].device) for v in norms]).max()
            self._norm_max = g if self._norm_max is None else torch.maximum(self._norm_max, g)

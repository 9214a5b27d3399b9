"""Device-side aggregates over every step of a logging window: no step goes unseen, none syncs.

The loss rules used to judge the one step that logs (every 50th by default): a blow-up on step 6
that settled by step 50, or a NaN on a step in between, went unseen. :class:`StepWindow` keeps,
for every step since the last logging step, the largest loss, whether any loss was NaN/Inf, and
the largest gradient norm the loop reported (the pre-clip norm from ``clip_grad_norm_``), as
tensors on the device. ``add`` is a list append; the reductions run on the logging step, where
:meth:`take` hands their results to the one read-back that step does anyway (:meth:`peek`
does without closing the window: the densely observed first steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Steps whose values wait for a logging step before they are reduced (bounds the lists' memory).
MAX_PENDING = 256


class StepWindow:
    """Largest loss, any non-finite loss and largest known grad norm since the last :meth:`take`."""

    def __init__(self) -> None:
        self.first_step: int | None = None
        self._losses: list[Tensor] = []
        self._norms: list[Tensor] = []
        self._parts: list[Tensor] | None = None  # [max loss, any bad, max norm | -1] folded so far

    def add(self, step: int, loss: Tensor, grad_norm: Tensor | None = None) -> None:
        """One step (training thread): appends only; nothing runs on the device."""
        if self.first_step is None:
            self.first_step = step
        self._losses.append(loss)
        if grad_norm is not None:
            self._norms.append(grad_norm)
        if len(self._losses) >= MAX_PENDING:
            self._fold()

    def _fold(self) -> None:
        losses, self._losses = self._losses, []
        norms, self._norms = self._norms, []
        if not losses:
            return
        x = torch.stack([v.reshape(()) for v in losses]).float()
        device = x.device
        g = (torch.stack([v.detach().reshape(()).float().to(device) for v in norms]).max() if norms
             else torch.full((), -1.0, device=device))
        parts = [x.max(), (~torch.isfinite(x)).any().float(), g]
        if self._parts is not None:  # torch.maximum propagates NaN, as a window max must
            parts = [torch.maximum(a, b) for a, b in zip(self._parts, parts)]
        self._parts = parts

    def peek(self) -> tuple[int | None, Tensor | None]:
        """``(first step, tensor [max loss, any non-finite (0/1), max grad norm or -1])`` of the
        window so far, on the device (read it back with the logging step's other values).
        ``(None, None)`` when no step was added. The window goes on: the run's first steps are
        each observed this way, and a single good step must not look like a whole good window."""
        self._fold()
        return self.first_step, (torch.stack(self._parts) if self._parts is not None else None)

    def take(self) -> tuple[int | None, Tensor | None]:
        """:meth:`peek`, then start the next window (a logging step, or an epoch's end)."""
        out = self.peek()
        self.first_step, self._parts = None, None
        return out

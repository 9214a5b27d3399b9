"""The scenarios and the plain training loop that runs one through ``tbhealth.Monitor``.

A scenario is data + model + optimizer (+ scheduler, clipping, a perturbation), the rules it
must raise (``expect``; empty for a healthy run), the rules that are true consequences of the
same root cause and so not wrong (``also``), and its onset: the step where the failure begins
(a number, or a function of the finished run's epoch history for failures that emerge).

The loop is what a user writes: forward, loss, backward, (clip), ``optimizer.step()``,
``Monitor.step(loss, n=, correct=, grad_norm=)``, ``zero_grad()``; validation each epoch,
``Monitor.end_epoch(val_loss=, val_acc=, val_count=)``. Accuracy counts predictions (tokens for
sequence targets), and ``n`` counts the same predictions.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import tbhealth
from tbhealth.run.rundir import RunDir


@dataclass
class Scenario:
    name: str
    what: str
    data: Callable
    model: Callable[[], nn.Module]
    epochs: int
    expect: frozenset[str] = frozenset()
    also: frozenset[str] = frozenset()
    optimizer: Callable = lambda params: torch.optim.Adam(params, lr=3e-3)
    scheduler: Callable | None = None  # (optimizer, steps_per_epoch, epochs) -> (scheduler, "step"|"epoch")
    batch_size: int = 64
    loss: Callable = F.cross_entropy
    classification: bool = True
    clip: float | None = None
    set_to_none: bool = True
    perturb: Callable | None = None  # (step, x, y) -> (x, y)
    onset: int | Callable | None = None  # a step, or fn(history, steps_per_epoch) -> step
    log_every: int = 50
    health: dict = field(default_factory=dict)

    @property
    def failure(self) -> bool:
        return bool(self.expect)


@dataclass
class Outcome:
    scenario: Scenario
    first: dict[str, int]  # rule -> step of its first alert
    episodes: dict[str, int]  # rule -> number of alert episodes
    onset: int | None
    steps: int
    seconds: float
    history: list[dict]
    run_dir: Path

    @property
    def detected(self) -> int | None:
        steps = [self.first[r] for r in self.scenario.expect if r in self.first]
        return min(steps) if steps else None

    @property
    def missed(self) -> set[str]:
        return set(self.scenario.expect) - set(self.first)

    @property
    def wrong(self) -> set[str]:
        """Alerts that should not be there: every alert of a healthy run; on a failure run, rules
        that are neither expected nor a consequence of the same root cause."""
        return set(self.first) - set(self.scenario.expect) - set(self.scenario.also)

    @property
    def delay(self) -> int | None:
        if self.detected is None or self.onset is None:
            return None
        return self.detected - self.onset


def _count(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Right predictions and predictions made: (N, C) vs (N,), or (N, C, T) vs (N, T) tokens."""
    return (out.argmax(1) == y).sum(), y.numel()


@torch.no_grad()
def _validate(scn: Scenario, model: nn.Module, val) -> tuple[float, float | None, int]:
    model.eval()
    x, y = val.tensors
    out = model(x)
    loss = float(scn.loss(out, y))
    correct, n = _count(out, y) if scn.classification else (None, len(y))
    return loss, (float(correct) / n if correct is not None else None), n


def run(scn: Scenario, logdir: Path, seed: int = 0) -> Outcome:
    """Train ``scn`` once, reporting to a Monitor; returns what its alerts said and when."""
    torch.manual_seed(seed)
    train, val = scn.data()
    model = scn.model()
    opt = scn.optimizer([p for p in model.parameters() if p.requires_grad])
    loader = DataLoader(train, batch_size=scn.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    sched, interval = scn.scheduler(opt, len(loader), scn.epochs) if scn.scheduler else (None, None)
    plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    health = {"every_steps": 50, **scn.health}
    began = time.perf_counter()
    with tbhealth.Monitor(logdir, scn.name, total_epochs=scn.epochs, model=model, optimizer=opt, health=health,
                          log_every=scn.log_every, verbose=False, system_metrics=False, handle_signals=False) as mon:
        for _ in mon.epochs(batches_per_epoch=len(loader)):
            model.train()
            for x, y in loader:
                if scn.perturb is not None:
                    x, y = scn.perturb(mon.global_step + 1, x, y)
                out = model(x)
                loss = scn.loss(out, y)
                loss.backward()
                norm = nn.utils.clip_grad_norm_(model.parameters(), scn.clip) if scn.clip else None
                opt.step()
                if interval == "step":
                    sched.step()
                correct, n = _count(out, y) if scn.classification else (None, len(y))
                mon.step(loss, n=n, correct=correct, grad_norm=norm)
                opt.zero_grad(set_to_none=scn.set_to_none)
            val_loss, val_acc, val_n = _validate(scn, model, val)
            mon.end_epoch(val_loss=val_loss, val_acc=val_acc, **_val_count(mon, val_n))
            if interval == "epoch":
                sched.step(val_loss) if plateau else sched.step()
    seconds = time.perf_counter() - began
    alerts = RunDir(mon.run_dir).read_alerts()
    first: dict[str, int] = {}
    episodes: dict[str, int] = {}
    for a in alerts:
        first[a["rule"]] = min(first.get(a["rule"], a["step"]), a["step"])
        episodes[a["rule"]] = episodes.get(a["rule"], 0) + 1
    history = list(mon.progress.history)
    onset = scn.onset(history, len(loader)) if callable(scn.onset) else scn.onset
    return Outcome(scn, first, episodes, onset, mon.global_step, seconds, history, mon.run_dir)


def _val_count(mon, n: int) -> dict:
    """``val_count=`` where this Monitor takes it (the validation size makes accuracy gaps judgeable)."""
    return {"val_count": n} if "val_count" in inspect.signature(mon.end_epoch).parameters else {}

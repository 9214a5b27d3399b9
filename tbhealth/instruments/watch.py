"""Glue between the Monitor and the pure health engine: histories in, alert events out.

The engine (tbhealth.health.rules/alerts) is pure; this class keeps the histories it needs,
drives the torch instruments on sampled steps, and serialises access to the alert tracker,
which the training thread (steps, epochs) and the monitor's watchdog thread (memory, stalls)
both use. Whether an alert is new is the tracker's answer (``AlertEvent.starts_episode``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

import torch

from tbhealth.health.alerts import AlertEvent, AlertTracker, health_score
from tbhealth.health.rules import EpochMetrics, Observation, check_all
from tbhealth.health.settings import HealthConfig
from tbhealth.instruments.probes import Instruments
from tbhealth.run.status import METRIC_KEYS

#: (rank or None, step loss, the epoch's loss sum so far, global grad norm or None) of one rank.
Reading = tuple[int | None, float, float, float | None]


class HealthWatch:
    """The health engine of one run, fed by the Monitor; see the module docstring."""

    def __init__(self, settings: HealthConfig | dict | None, model: torch.nn.Module | None = None):
        self.cfg = settings if isinstance(settings, HealthConfig) else HealthConfig.model_validate(settings or {})
        self.instruments = Instruments(model, self.cfg) if model is not None and self.cfg.enabled else None
        self.tracker = AlertTracker()
        self.initial_loss: float | None = None
        n = self.cfg.history_len()
        self.step_losses: deque[tuple[int, float]] = deque(maxlen=n)
        self.grad_norms: deque[float] = deque(maxlen=n)
        self._lock = threading.Lock()
        self._seen_step, self._seen_at = -1, time.time()  # last step count the watchdog saw change
        self._first_loss: torch.Tensor | None = None  # the run's first step loss, on the device until read
        self._captured = False  # this sampled step's gradients were taken by gradients_ready()

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of an earlier session: open alerts keep their ids (and
        are not new), the divergence baseline and the windowed histories carry over."""
        self.tracker = AlertTracker(open_alerts=state.get("open_alerts", ()))
        self.initial_loss = state.get("initial_loss")
        self.step_losses.extend(state.get("step_losses", ()))
        self.grad_norms.extend(state.get("grad_norms", ()))

    @property
    def armed(self) -> bool:
        return self.instruments is not None and self.instruments.armed

    @property
    def wants_first_loss(self) -> bool:
        return self.initial_loss is None and self._first_loss is None

    def note_first_loss(self, loss: torch.Tensor) -> None:
        """Keep the first step's loss on the device (no sync) for the next logging step to read.

        ``divergence`` compares with the *initial* loss. The first *logged* loss comes
        ``log_every`` steps later, when a far too high learning rate has already blown it up
        (SGD lr=50 on digits: 2.3 at step 1, 5e10 at step 5), and 10x that never fires.
        """
        self._first_loss = loss.detach().float().reshape(()).clone()

    # ------------------------------------------------------------------ training thread

    def before_step(self, next_step: int) -> None:
        """Arm the activation hooks when the coming step is sampled (only then do they exist)."""
        if self.instruments is not None and next_step % self.cfg.every_steps == 0:
            self.instruments.arm()

    def gradients_ready(self) -> None:
        """On a sampled step, take the per-layer gradient norms now (after backward and
        ``unscale_``, before clipping) rather than at the step's end, after clipping; the last
        call before the step's end counts."""
        if self.armed:
            self.instruments.capture_gradients()
            self._captured = True

    def read_sample(self) -> dict:
        """A sampled step just finished: read this process's instruments (one sync)."""
        inst = self.instruments
        inst.disarm()
        if not self._captured:
            inst.capture_gradients()
        self._captured = False
        return inst.read()

    def evaluate_sample(self, *, epoch: int, step: int, samples: list[tuple[int | None, dict]]
                        ) -> tuple[dict[str, float], list[AlertEvent]]:
        """Layer rules over the readings of every rank (one entry without DDP)."""
        first = samples[0][1]
        scalars: dict[str, float] = {}
        for key, tag in (("dead_fraction", "dead_units"), ("zero_fraction", "zero_activations"),
                         ("layer_grad_norms", "grad_norm")):
            for layer, value in (first.get(key) or {}).items():
                scalars[f"health/{tag}/{layer}"] = value
        if first.get("global_grad_norm") is not None:
            scalars["health/grad_norm/global"] = first["global_grad_norm"]
        now = time.time()
        observations = [
            Observation(
                epoch=epoch, step=step, now=now, dead_fraction=r.get("dead_fraction"),
                zero_fraction=r.get("zero_fraction"),
                # gradients are all-reduced under DDP: every rank holds the same, judge them once
                layer_grad_norms=r.get("layer_grad_norms") if i == 0 else None,
                nonfinite=r.get("nonfinite"), rank=rank,
            )
            for i, (rank, r) in enumerate(samples)
        ]
        return scalars, self._run(observations, epoch, step)

    def on_log_step(self, *, epoch: int, step: int, readings: list[Reading]) -> list[AlertEvent]:
        """A logging step: loss rules on each rank's :data:`Reading`."""
        if self.initial_loss is None and self._first_loss is not None:
            first, self._first_loss = self._first_loss.item(), None  # already in sync: a logging step
            self.initial_loss = first if math.isfinite(first) else None
        history = tuple(self.step_losses)
        norms = tuple(self.grad_norms)
        observations = []
        for i, (rank, loss, loss_sum, grad_norm) in enumerate(readings):
            finite = math.isfinite(loss) and math.isfinite(loss_sum)
            if self.initial_loss is None and math.isfinite(loss):
                self.initial_loss = loss
            observations.append(Observation(
                epoch=epoch, step=step, now=time.time(), step_losses=history + ((step, loss),),
                initial_loss=self.initial_loss, nonfinite=None if finite else "loss",
                global_grad_norm=grad_norm if i == 0 else None, grad_norm_history=norms, rank=rank,
            ))
        losses = [r[1] for r in readings if math.isfinite(r[1])]
        if losses:
            self.step_losses.append((step, sum(losses) / len(losses)))
        grad_norm = readings[0][3]
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
        return self._run(observations, epoch, step)

    def on_epoch(self, *, epoch: int, step: int, history: list[dict]) -> list[AlertEvent]:
        epochs = tuple(EpochMetrics(epoch=h["epoch"], **{k: h.get(k) for k in METRIC_KEYS}) for h in history)
        return self._run([Observation(epoch=epoch, step=step, now=time.time(), epochs=epochs)], epoch, step)

    # ------------------------------------------------------------------ watchdog thread

    def on_tick(self, progress, system: dict | None) -> list[AlertEvent]:
        """Wall-clock rules: GPU memory from the system sampler, and stalled steps."""
        gpu = (system or {}).get("gpu") or {}
        now = time.time()
        if progress.global_step != self._seen_step:  # progress seen from here: nothing on the step path
            self._seen_step, self._seen_at = progress.global_step, now
        obs = Observation(
            epoch=progress.epoch, step=progress.global_step, now=now, state=progress.state,
            gpu_memory_used=gpu.get("memory_used_bytes"), gpu_memory_total=gpu.get("memory_total_bytes"),
            last_progress_time=max(progress.last_step_time, self._seen_at),
        )
        return self._run([obs], progress.epoch, progress.global_step)

    # ------------------------------------------------------------------ shared

    def _run(self, observations: list[Observation], epoch: int, step: int) -> list[AlertEvent]:
        findings, checked = check_all(observations, self.cfg)
        with self._lock:
            return self.tracker.update(findings, epoch=epoch, step=step, now=observations[0].now, checked=checked)

    def active_count(self) -> int:
        with self._lock:
            return len(self.tracker.active())

    def score(self, warnings: int, errors: int) -> int:
        with self._lock:
            return health_score(self.tracker.active(), warnings, errors)

    def state_dict(self) -> dict:
        with self._lock:
            open_alerts = self.tracker.active()
        return {"open_alerts": open_alerts, "initial_loss": self.initial_loss,
                "step_losses": list(self.step_losses), "grad_norms": list(self.grad_norms)}

    def close(self) -> None:
        if self.instruments is not None:
            self.instruments.disarm()

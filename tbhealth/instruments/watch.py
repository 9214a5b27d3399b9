"""Glue between the Monitor and the pure health engine: histories in, alert events out.

The engine (tbhealth.health.rules/alerts) is pure; this class keeps the histories it needs,
drives the torch instruments on sampled steps, and serialises access to the alert tracker,
which the training thread (steps, epochs) and the heartbeat thread (memory, stalls) both use.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

import torch

from tbhealth.health.alerts import AlertTracker, health_score
from tbhealth.instruments.probes import Instruments
from tbhealth.health.rules import EpochMetrics, Observation, check_all
from tbhealth.health.settings import HealthConfig


class HealthWatch:
    def __init__(self, settings: HealthConfig | dict | None, model: torch.nn.Module | None = None,
                 state: dict | None = None):
        self.cfg = settings if isinstance(settings, HealthConfig) else HealthConfig.model_validate(settings or {})
        state = state or {}
        self.instruments = Instruments(model, self.cfg) if model is not None and self.cfg.enabled else None
        self.tracker = AlertTracker(open_alerts=state.get("open_alerts", ()))
        self.initial_loss: float | None = state.get("initial_loss")
        n = self.cfg.history_len()
        self.step_losses: deque[tuple[int, float]] = deque(state.get("step_losses", ()), maxlen=n)
        self.grad_norms: deque[float] = deque(state.get("grad_norms", ()), maxlen=n)
        self._lock = threading.Lock()
        self._seen_step, self._seen_at = -1, time.time()  # last step count the heartbeat saw change
        self._fired: set[str] = {a["id"] for a in state.get("open_alerts", ())}
        self._first_loss: torch.Tensor | None = None  # the run's first step loss, on the device until read

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

    def read_sample(self) -> dict:
        """A sampled step just finished: read this process's instruments (one sync)."""
        inst = self.instruments
        inst.disarm()
        inst.capture_gradients()
        return inst.read()

    def evaluate_sample(self, *, epoch: int, step: int, samples: list[tuple[int | None, dict]]
                        ) -> tuple[dict[str, float], list[dict]]:
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
                nonfinite=r.get("nonfinite") if r.get("nonfinite") == "gradients" else None, rank=rank,
            )
            for i, (rank, r) in enumerate(samples)
        ]
        return scalars, self._run(observations, epoch, step)

    def on_log_step(self, *, epoch: int, step: int,
                    readings: list[tuple[int | None, float, float, float | None]]) -> list[dict]:
        """A logging step: loss rules on ``(rank, loss, epoch loss sum, grad norm)`` of each rank."""
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

    def on_epoch(self, *, epoch: int, step: int, history: list[dict]) -> list[dict]:
        epochs = tuple(EpochMetrics(epoch=h["epoch"], train_loss=h.get("train_loss"), val_loss=h.get("val_loss"),
                                    train_acc=h.get("train_acc"), val_acc=h.get("val_acc"), lr=h.get("lr"))
                       for h in history)
        return self._run([Observation(epoch=epoch, step=step, now=time.time(), epochs=epochs)], epoch, step)

    # ------------------------------------------------------------------ heartbeat thread

    def on_tick(self, progress, system: dict | None) -> list[dict]:
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

    def _run(self, observations: list[Observation], epoch: int, step: int) -> list[dict]:
        findings, checked = check_all(observations, self.cfg)
        with self._lock:
            events = self.tracker.update(findings, epoch=epoch, step=step, now=observations[0].now,
                                         checked=checked)
            for ev in events:  # "new": the first event of an episode, the one that triggers its action
                ev["new"] = ev["id"] not in self._fired
                self._fired.add(ev["id"])
        return events

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

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
from tbhealth.health.instruments import Instruments
from tbhealth.health.rules import EpochMetrics, Observation, check
from tbhealth.health.settings import HealthConfig


class HealthWatch:
    def __init__(self, settings: HealthConfig | dict | None, model: torch.nn.Module | None = None,
                 state: dict | None = None, rank: int | None = None):
        self.cfg = settings if isinstance(settings, HealthConfig) else HealthConfig.model_validate(settings or {})
        state = state or {}
        self.rank = rank
        self.instruments = Instruments(model, self.cfg) if model is not None and self.cfg.enabled else None
        self.tracker = AlertTracker(open_alerts=state.get("open_alerts", ()))
        self.initial_loss: float | None = state.get("initial_loss")
        n = self.cfg.history_len()
        self.step_losses: deque[tuple[int, float]] = deque(state.get("step_losses", ()), maxlen=n)
        self.grad_norms: deque[float] = deque(state.get("grad_norms", ()), maxlen=n)
        self._lock = threading.Lock()
        self._fired: set[str] = {a["id"] for a in state.get("open_alerts", ())}

    @property
    def armed(self) -> bool:
        return self.instruments is not None and self.instruments.armed

    # ------------------------------------------------------------------ training thread

    def before_step(self, next_step: int) -> None:
        """Arm the activation hooks when the coming step is sampled (only then do they exist)."""
        if self.instruments is not None and next_step % self.cfg.every_steps == 0:
            self.instruments.arm()

    def after_step(self, *, epoch: int, step: int) -> tuple[dict[str, float], list[dict]]:
        """A sampled step just finished: read the instruments (one sync) and run the layer rules."""
        inst = self.instruments
        inst.disarm()
        inst.capture_gradients()
        r = inst.read()
        scalars: dict[str, float] = {}
        for key, tag in (("dead_fraction", "dead_units"), ("zero_fraction", "zero_activations"),
                         ("layer_grad_norms", "grad_norm")):
            for layer, value in (r.get(key) or {}).items():
                scalars[f"health/{tag}/{layer}"] = value
        if r.get("global_grad_norm") is not None:
            scalars["health/grad_norm/global"] = r["global_grad_norm"]
        obs = Observation(
            epoch=epoch, step=step, now=time.time(), layer_grad_norms=r.get("layer_grad_norms"),
            dead_fraction=r.get("dead_fraction"), zero_fraction=r.get("zero_fraction"),
            nonfinite=r.get("nonfinite") if r.get("nonfinite") == "gradients" else None, rank=self.rank,
        )
        return scalars, self._run(obs, epoch, step)

    def on_log_step(self, *, epoch: int, step: int, loss: float, loss_sum: float,
                    grad_norm: float | None) -> tuple[dict[str, float], list[dict]]:
        """A logging step: loss-based rules on values the monitor has just read back."""
        nonfinite = None if math.isfinite(loss) and math.isfinite(loss_sum) else "loss"
        if self.initial_loss is None and math.isfinite(loss):
            self.initial_loss = loss
        self.step_losses.append((step, loss))
        history = list(self.grad_norms)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
        obs = Observation(
            epoch=epoch, step=step, now=time.time(), step_losses=tuple(self.step_losses),
            initial_loss=self.initial_loss, nonfinite=nonfinite, global_grad_norm=grad_norm,
            grad_norm_history=tuple(history), rank=self.rank,
        )
        return {}, self._run(obs, epoch, step)

    def on_epoch(self, *, epoch: int, step: int, history: list[dict]) -> list[dict]:
        epochs = tuple(EpochMetrics(epoch=h["epoch"], train_loss=h.get("train_loss"), val_loss=h.get("val_loss"),
                                    train_acc=h.get("train_acc"), val_acc=h.get("val_acc"), lr=h.get("lr"))
                       for h in history)
        obs = Observation(epoch=epoch, step=step, now=time.time(), epochs=epochs, rank=self.rank)
        return self._run(obs, epoch, step)

    # ------------------------------------------------------------------ heartbeat thread

    def on_tick(self, progress, system: dict | None) -> list[dict]:
        """Wall-clock rules: GPU memory from the system sampler, and stalled steps."""
        gpu = (system or {}).get("gpu") or {}
        obs = Observation(
            epoch=progress.epoch, step=progress.global_step, now=time.time(), state=progress.state,
            gpu_memory_used=gpu.get("memory_used_bytes"), gpu_memory_total=gpu.get("memory_total_bytes"),
            last_progress_time=progress.last_step_time, rank=self.rank,
        )
        return self._run(obs, progress.epoch, progress.global_step)

    # ------------------------------------------------------------------ shared

    def _run(self, obs: Observation, epoch: int, step: int) -> list[dict]:
        findings, checked = check(obs, self.cfg)
        with self._lock:
            events = self.tracker.update(findings, epoch=epoch, step=step, now=obs.now, checked=checked)
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

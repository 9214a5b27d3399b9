"""Glue between the Monitor and the pure health engine: histories in, alert events out.

The engine (tbhealth.health.rules/alerts) is pure; this class keeps the histories it needs,
drives the torch instruments on sampled steps, and serialises access to the alert tracker,
which the training thread (steps, epochs) and the monitor's watchdog thread (memory, stalls)
both use. Whether an alert is new is the tracker's answer (``AlertEvent.starts_episode``).

Logging rounds and epoch rounds both judge the whole current picture: the latest logging window
of each rank and the epoch history. A rule then reads the same inputs whichever kind of step
triggered the round, so its verdict cannot swing between "firing" on logging steps and "clear"
at epoch ends (the flapping of issue #10). A sample round judges the sample alone: the rules it
feeds read nothing else, and the others find no input in it. A rule whose inputs a round lacks
is not checked and its alerts stay open.
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
from tbhealth.instruments.stacks import thread_stack
from tbhealth.run.status import METRIC_KEYS

#: One rank's logging-step reading: (rank or None, step loss, first step of the window, the
#: window's largest step loss, whether any step's loss in it was NaN/Inf, the largest gradient
#: norm known in it (reported pre-clip, or measured on this step) or None).
Reading = tuple[int | None, float, int | None, float, bool, float | None]


class HealthWatch:
    """The health engine of one run, fed by the Monitor; see the module docstring."""

    def __init__(self, settings: HealthConfig | dict | None, model: torch.nn.Module | None = None):
        self.cfg = settings if isinstance(settings, HealthConfig) else HealthConfig.model_validate(settings or {})
        self.instruments = Instruments(model, self.cfg) if model is not None and self.cfg.enabled else None
        self.tracker = AlertTracker()
        self.initial_loss: float | None = None
        self.initial_grad_norm: float | None = None
        n = self.cfg.history_len()
        self.step_losses: deque[tuple[int, float]] = deque(maxlen=n)  # each window's largest loss
        self.grad_norms: deque[float] = deque(maxlen=n)  # each window's largest norm
        self._windows: list[Observation] = []  # the latest logging round, one per rank
        self._window_norm: float | None = None  # largest norm measured so far in the open window
        self._epochs: tuple[EpochMetrics, ...] = ()
        self._counts: dict[int, tuple[int | None, int | None]] = {}  # epoch -> (train, val) predictions
        self._lock = threading.Lock()
        self._seen_step, self._seen_at = -1, time.time()  # last step count the watchdog saw change
        self._first_loss: torch.Tensor | None = None  # the run's first step loss, on the device until read
        self._sampling = False  # the coming (or current) step is sampled
        self._probed = False  # the first sample also counted functional activations
        self._captured = False  # this sampled step's gradients were taken by gradients_ready()
        self.training_thread: int | None = None  # whose stack a stall shows
        self._dense, self._every = self.cfg.dense_steps, self.cfg.every_steps  # plain ints: read every step

    def layer_names(self) -> list[str] | None:
        """The measured layers in model order (None: checks off), for the per-layer view."""
        return self.instruments.layer_names() if self.instruments is not None else None

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of an earlier session: open alerts keep their ids (and
        are not new), the divergence baseline and the windowed histories carry over."""
        self.tracker = AlertTracker(open_alerts=state.get("open_alerts", ()))
        self.initial_loss = state.get("initial_loss")
        self.initial_grad_norm = state.get("initial_grad_norm")
        self.step_losses.extend(tuple(x) for x in state.get("step_losses", ()))
        self.grad_norms.extend(state.get("grad_norms", ()))
        self._counts = {int(k): tuple(v) for k, v in state.get("counts", {}).items()}

    @property
    def armed(self) -> bool:
        """The step in progress is sampled: read its instruments at :meth:`read_sample`."""
        return self._sampling

    @property
    def wants_first_loss(self) -> bool:
        return self.initial_loss is None and self._first_loss is None

    def note_first_loss(self, loss: torch.Tensor) -> None:
        """Keep the first step's loss on the device (no sync) for the next logging step to read.

        ``divergence`` compares with the *initial* loss. With ``dense_steps: 0`` the first
        *logged* loss comes ``log_every`` steps later, when a far too high learning rate has
        already blown it up (SGD lr=50 on digits: 2.3 at step 1, 5e10 at step 5).
        """
        self._first_loss = loss.detach().float().reshape(()).clone()

    # ------------------------------------------------------------------ training thread

    def before_step(self, next_step: int) -> None:
        """Arm the instruments when the coming step is sampled (each of the first ``dense_steps``,
        then every ``every_steps``). Gradient norms need no hooks, so a model without activation
        modules is sampled all the same."""
        if self.training_thread is None:
            self.training_thread = threading.get_ident()
        if self.instruments is not None and (next_step <= self._dense or next_step % self._every == 0):
            self.instruments.arm(probe=not self._probed)
            self._sampling = True

    def gradients_ready(self) -> None:
        """On a sampled step, take the per-layer gradient norms now (after backward and
        ``unscale_``, before clipping) rather than at the step's end, after clipping; the last
        call before the step's end counts."""
        if self.armed:
            self.instruments.capture_gradients()
            self._captured = True

    def read_sample(self, reported: torch.Tensor | None = None) -> dict:
        """A sampled step just finished: read this process's instruments (one sync). ``reported``:
        the norm the loop passed to ``Monitor.step`` (pre-clip), read in the same transfer."""
        inst = self.instruments
        inst.disarm()
        if not self._captured:
            inst.capture_gradients()
        self._captured = self._sampling = False
        sample = inst.read(reported)
        if not self._probed:
            self._probed = True
            sample["coverage"] = inst.coverage()
        return sample

    def evaluate_sample(self, *, epoch: int, step: int, samples: list[tuple[int | None, dict]]
                        ) -> tuple[dict[str, float], list[AlertEvent]]:
        """Layer rules over the readings of every rank (one entry without DDP)."""
        first = _pre_clip(samples[0][1])
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
                layer_grad_norms=first.get("layer_grad_norms") if i == 0 else None,
                nonfinite=r.get("nonfinite") if i == 0 else None, rank=rank,
            )
            for i, (rank, r) in enumerate(samples)
        ]
        # alone: the loss and epoch rules find no input in a sample and stay as the last round left them
        return scalars, self._run(observations, epoch, step)

    def on_log_step(self, *, epoch: int, step: int, readings: list[Reading], closes: bool = True
                    ) -> list[AlertEvent]:
        """A logging step: the loss and gradient rules on each rank's :data:`Reading`. ``closes``:
        the window ended here; only ended windows join the histories the ratio tests compare with."""
        if self.initial_loss is None and self._first_loss is not None:
            first, self._first_loss = self._first_loss.item(), None  # already in sync: a logging step
            self.initial_loss = first if math.isfinite(first) else None
        norm = readings[0][5]
        if self.initial_grad_norm is None and norm is not None and math.isfinite(norm):
            self.initial_grad_norm = norm
        if norm is not None and self._window_norm is not None and math.isfinite(norm):
            norm = max(norm, self._window_norm)  # a norm measured on a dense step joins its window's
        self._window_norm = None if closes else norm
        history, norms, now = tuple(self.step_losses), tuple(self.grad_norms), time.time()
        self._windows = []
        for i, (rank, loss, start, largest, bad, _) in enumerate(readings):
            if self.initial_loss is None and math.isfinite(loss):
                self.initial_loss = loss
            self._windows.append(Observation(
                epoch=epoch, step=step, now=now, step_losses=history + ((step, largest),), window_start=start,
                initial_loss=self.initial_loss, nonfinite="loss" if bad else None,
                global_grad_norm=norm if i == 0 else None, grad_norm_history=norms,
                initial_grad_norm=self.initial_grad_norm, rank=rank,
            ))
        largest = [r[3] for r in readings if math.isfinite(r[3])]
        if largest and closes:
            self.step_losses.append((step, sum(largest) / len(largest)))
        if norm is not None and math.isfinite(norm) and closes:
            self.grad_norms.append(norm)
        return self._round(epoch, step)

    def on_epoch(self, *, epoch: int, step: int, history: list[dict],
                 counts: tuple[int | None, int | None] = (None, None)) -> list[AlertEvent]:
        """An epoch ended; ``counts``: the predictions its train and val accuracies were measured over."""
        self._counts[epoch] = counts
        self._epochs = tuple(EpochMetrics(h["epoch"], **{k: h.get(k) for k in METRIC_KEYS},
                                          train_count=self._counts.get(h["epoch"], (None, None))[0],
                                          val_count=self._counts.get(h["epoch"], (None, None))[1])
                             for h in history)
        return self._round(epoch, step)

    def _round(self, epoch: int, step: int) -> list[AlertEvent]:
        """The latest windows and the epoch history (rank 0's reduced metrics, judged once
        without a rank)."""
        whole = list(self._windows)
        if self._epochs:
            whole.append(Observation(epoch=epoch, step=step, now=time.time(), epochs=self._epochs))
        return self._run(whole, epoch, step) if whole else []

    # ------------------------------------------------------------------ watchdog thread

    def on_tick(self, progress, system: dict | None) -> list[AlertEvent]:
        """Wall-clock rules: GPU memory from the system sampler, and stalled steps (with the
        training thread's stack once the stall is long enough to fire)."""
        gpu = (system or {}).get("gpu") or {}
        now = time.time()
        if progress.global_step != self._seen_step:  # progress seen from here: nothing on the step path
            self._seen_step, self._seen_at = progress.global_step, now
        last = max(progress.last_step_time, self._seen_at)
        stalled = now - last > self.cfg.stalled.timeout_s and self.training_thread is not None
        obs = Observation(
            epoch=progress.epoch, step=progress.global_step, now=now, state=progress.state,
            gpu_memory_used=gpu.get("memory_used_bytes"), gpu_memory_total=gpu.get("memory_total_bytes"),
            last_progress_time=last,
            stack=thread_stack(self.training_thread, all_threads=self.cfg.stalled.all_threads) if stalled else None,
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
                "initial_grad_norm": self.initial_grad_norm, "step_losses": list(self.step_losses),
                "grad_norms": list(self.grad_norms), "counts": {str(k): list(v) for k, v in self._counts.items()}}

    def close(self) -> None:
        if self.instruments is not None:
            self.instruments.disarm()


def _pre_clip(sample: dict) -> dict:
    """A sample whose gradients were clipped before they were captured, scaled back to the norm
    the loop reported (pre-clip): a layer shrunk 1e4-fold by clipping is not vanishing."""
    pre, post = sample.get("reported_grad_norm"), sample.get("global_grad_norm")
    if not pre or not post or not math.isfinite(pre) or pre <= post * (1 + 1e-6):
        return sample
    scale = pre / post
    norms = sample.get("layer_grad_norms") or {}
    return {**sample, "global_grad_norm": pre, "layer_grad_norms": {k: v * scale for k, v in norms.items()}}

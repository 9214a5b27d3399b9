"""``tbhealth.Monitor``: the object a training loop reports to, and takes orders from.

Any loop can use it (the config-driven Trainer is one user)::

    with tbhealth.Monitor("runs", "exp", total_epochs=10, model=model, optimizer=opt) as mon:
        for epoch in mon.epochs(batches_per_epoch=len(loader)):
            for x, y in loader:
                loss = loss_fn(model(x), y); loss.backward(); opt.step()
                mon.step(loss, n=len(x))          # after optimizer.step, before zero_grad
                opt.zero_grad()
                if mon.should_stop: break
            mon.end_epoch(val_loss=..., val_acc=...)

Cost on the training thread (see benchmarks/): ``step()`` appends the loss tensor to a list and
does a few integer and time checks (~10 µs). Every ``log_every`` steps it sums the listed losses
on the device and reads the loss, the running sum and the gradient norm back in ONE transfer
(the only host-device sync) and queues one event. Health instruments exist only on sampled
steps. Control requests, pausing and stopping live in :mod:`tbhealth.monitor.controller`; the heartbeat,
system sampling and event writing run on background threads.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tbhealth.run.names import unique_run_dir

from tbhealth.run.rundir import RunDir

from tbhealth.run.states import FINAL_STATES
from tbhealth.monitor.control import ControlChannel
from tbhealth.distributed import CONTROL_SYNC_EVERY, DistContext
from tbhealth.monitor.events import EventWriter
from tbhealth.monitor.heartbeat import Heartbeat
from tbhealth.monitor.progress import Progress
from tbhealth.run.status import build_status
from tbhealth.monitor.reporter import Reporter
from tbhealth.monitor.controller import Steering

CUSTOM_SCALARS = {
    "Training": {
        "Loss (train vs val)": ["^train/loss$", "^val/loss$"],
        "Accuracy (train vs val)": ["^train/acc$", "^val/acc$"],
        "Learning rate": ["^lr$"],
    },
    "Steps": {"Step loss": ["^step/loss$"], "Gradient norm": ["^step/grad_norm$"]},
}
SYSTEM_SCALARS_EVERY_S = 5.0
MAX_PENDING = 256  # steps whose loss waits for a logging step before it is summed (bounds memory)


class Monitor(Steering):
    """Opens a run, records what the loop reports, watches its health and applies control requests.

    Args:
        logdir, name: where the run goes (``name`` made unique); ignored when ``run_dir`` is given.
        total_epochs: planned epochs, for progress and ETA.
        model, optimizer: instrumented for gradient norms and health checks (optional).
        checkpoint_fn: ``fn(kind) -> Path`` the monitor calls at a step boundary to save a
            checkpoint (kind ``manual`` or ``stop``); without it those requests are refused.
        health: the ``health:`` settings (dict or HealthConfig); ``False`` turns checks off.
        log_every: read values back and log per-step scalars every this many steps.
        resume_state: ``Monitor.state_dict()`` from a checkpoint, to continue a run.
        dist: under torch.distributed (tbhealth.distributed.DistContext): rank 0 writes events,
            status and checkpoints; every rank logs, is measured, and obeys control at the same step.
    """

    def __init__(
        self, logdir: str | os.PathLike = "runs", name: str | None = None, *, total_epochs: int,
        run_dir: str | os.PathLike | None = None, model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None, checkpoint_fn: Callable[[str], Path] | None = None,
        health: Any = None, log_every: int = 50, resume_state: dict | None = None, verbose: bool = True,
        reporter: Reporter | None = None, handle_signals: bool = True, system_metrics: bool = True,
        dist: DistContext | None = None,
    ):
        if run_dir is None:
            run_dir = unique_run_dir(logdir, name or time.strftime("run-%Y%m%d-%H%M%S"))
        self.run = RunDir(run_dir)
        self.run_dir = self.run.path
        self.model, self.optimizer, self.checkpoint_fn = model, optimizer, checkpoint_fn
        self.log_every = max(1, int(log_every))
        self.dist = dist
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist else (0, 1)
        self._rank_id = self.rank if dist else None  # how findings name the rank: not at all without DDP
        self.is_writer = self.rank == 0
        self._ranks: list[dict] = []
        self.progress = Progress(run=self.run_dir.name, total_epochs=total_epochs, world_size=self.world_size)
        self.reporter = reporter or Reporter(enabled=verbose and self.is_writer)
        self._handle_signals = handle_signals
        self._want_system = system_metrics
        self._health_settings = health
        self._resume_state = resume_state
        self._lock = threading.Lock()
        self._stop_reason: str | None = None
        self._stop_wanted: str | None = None  # a stop asked for by a signal or request_stop()
        self._paused = False
        self._pending_actions: list[tuple[str, str]] = []
        self._actions_lock = threading.Lock()  # the heartbeat thread queues actions too
        self._old_handlers: dict = {}
        self._loss_sum = self._correct_sum = None
        self._pending: list[tuple[torch.Tensor, int, torch.Tensor | None]] = []
        self._resumed_sums: list | None = None  # [loss sum, correct sum | None, count] before a resume
        self._count = 0
        self._last_step_loss: float | None = None
        self._next_system_scalars = 0.0
        self.writer: EventWriter | None = None
        self.health = None
        self.system = None
        self._control: ControlChannel | None = None
        self._heartbeat: Heartbeat | None = None
        self._closed = False
        self._final_written = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Monitor":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("stopped", message="aborted by a second interrupt; no checkpoint written")
        else:
            self.fail(exc)
        return False

    def start(self) -> "Monitor":
        p = self.progress
        if self._resume_state:
            self._load_state(self._resume_state)
        self.health = self._make_health()  # first: bad health settings fail before any thread starts
        try:
            self._open_outputs()
            if self._handle_signals and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            p.state = "training"
            self.reporter.start(str(self.run_dir), p.total_epochs, p.epochs_done)
            self._write_status()
            if self._heartbeat:
                self._heartbeat.start()
        except BaseException as e:  # leave no thread, handler or "training" status behind
            self.fail(e)
            raise
        return self

    def _open_outputs(self) -> None:
        """Rank 0's event file, control channel, system sampler and heartbeat."""
        if not self.is_writer:
            return
        self.run.state_dir.mkdir(parents=True, exist_ok=True)
        self.writer = EventWriter(self.run_dir, flush_secs=1.0)
        self.writer.custom_scalars(CUSTOM_SCALARS)
        self._control = ControlChannel(self.run)
        stale = self._control.reject_stale()
        if stale:
            self.log("WARNING", f"rejected {stale} control request(s) sent while the run was not live")
        if self._want_system:
            from tbhealth.monitor.system import SystemSampler

            self.system = SystemSampler(interval=1.0, gpu_index=self._gpu_index())
            self.system.start()
        self._heartbeat = Heartbeat(self._beat, interval=1.0)

    def close(self, state: str | None = None, message: str | None = None) -> None:
        """Finish the run: ``completed`` unless a stop was requested (then ``stopped``)."""
        if self._closed:
            return
        self._closed = True
        p = self.progress
        p.state = state or ("stopped" if self._stop_reason else "completed")
        p.message = message or self._stop_reason
        if p.state == "stopped" and p.interventions["stops"] == 0:
            p.interventions["stops"] += 1
        if self.dist:  # every rank says where it ended: they must agree
            self.log("INFO", f"rank {self.rank} {p.state} at step {p.global_step}", echo=False)
        self._finish()

    def fail(self, exc: BaseException) -> None:
        """Record a crash: state ``failed`` and the traceback in the run's log."""
        if self._closed:
            return
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        where = f"rank {self.rank}: " if self.dist else ""
        self.log("ERROR", f"{where}training failed: {type(exc).__name__}: {exc}\n{tb}", echo=False)
        self.reporter.log("ERROR", f"training failed: {type(exc).__name__}: {exc}")
        self._closed = True
        self.progress.state = "failed"
        self.progress.message = f"{where}{type(exc).__name__}: {exc}"
        if self.dist and not self.is_writer:
            self.run.record_rank_failure(self.rank, self.progress.message)
        elif self.dist and (peers := self.run.rank_failures()):
            self.progress.message = peers[0]["message"]  # the root cause, not this rank's broken pipe
        self._finish()

    def _finish(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        if self.health is not None:
            self.health.close()
        if self._heartbeat:
            self._heartbeat.stop()
        if self.system:
            self.system.stop()
        self.reporter.close()
        if self.is_writer:
            self._write_status()
        if self.writer:
            self.writer.text(self.progress.global_step, "run/state", f"Run finished: **{self.progress.state}**")
            self.writer.close()

    # ------------------------------------------------------------------ the loop's calls

    def epochs(self, batches_per_epoch: int | None = None) -> Iterator[int]:
        """Epoch numbers (1-based) still to train; ends early when a stop was requested."""
        first = self.progress.epochs_done + 1
        for epoch in range(first, self.progress.total_epochs + 1):
            if epoch > first and self.dist is None:
                # requests, signals and epoch-level health actions that arrived during validation
                # and checkpoints apply at this boundary, not one step into the next epoch
                self._local_control(force=True)
                while self._paused and not self._stop_reason:
                    self._wait_paused()
            if self.should_stop:
                return
            resume_batch = self.progress.batch if epoch == first else 0
            self.start_epoch(epoch, batches_per_epoch, resume_batch)
            yield epoch

    def start_epoch(self, epoch: int, batches_per_epoch: int | None = None, batch: int = 0) -> None:
        p = self.progress
        p.epoch, p.batches_per_epoch, p.batch = epoch, batches_per_epoch, batch
        p.epoch_start, p.epoch_paused_s = time.monotonic(), 0.0
        self._loss_sum = self._correct_sum = None
        self._pending = []
        self._count = 0
        if not batch:
            self._resumed_sums = None
        self.reporter.epoch_started(epoch, batches_per_epoch)

    def step(self, loss: torch.Tensor, *, n: int = 1, correct: torch.Tensor | None = None,
             grad_norm: torch.Tensor | None = None) -> None:
        """Report one optimizer step: call after ``optimizer.step()`` and before ``zero_grad()``.

        ``loss`` is the batch's mean loss (a tensor: it is not read back unless this step logs),
        ``n`` the batch size, ``correct`` the number of right predictions (a tensor, optional),
        ``grad_norm`` the total norm if the loop already has it (e.g. from clipping).
        """
        p = self.progress
        p.global_step += 1
        p.batch += 1
        loss = loss.detach()
        self._pending.append((loss, n, correct))  # summed on the device at the next logging step
        self._count += n
        if len(self._pending) >= MAX_PENDING:
            self._fold()
        health = self.health
        if health is not None and health.wants_first_loss:  # divergence compares with step 1's loss
            health.note_first_loss(loss)
        if health is not None and health.armed:
            self._sample_health()
        if p.global_step % self.log_every == 0:
            self._log_step(loss, grad_norm)
        if health is not None:
            health.before_step(p.global_step + 1)
        if self.dist is None:
            self._local_control()
        elif p.global_step % CONTROL_SYNC_EVERY == 0:
            self._sync_control()
        while self._paused and not self._stop_reason:
            self._wait_paused()
        self.reporter.step(p.batch, self._last_step_loss)

    def end_epoch(self, *, val_loss: float | None = None, val_acc: float | None = None, lr: float | None = None,
                  train_loss: float | None = None, train_acc: float | None = None, **scalars: float) -> dict:
        """Report a finished epoch; train loss/accuracy default to the means of ``step()``'s values."""
        p = self.progress
        self._fold()
        if train_loss is None and (self._loss_sum is not None or self._resumed_sums):
            train_loss, acc = self._epoch_means()
            train_acc = acc if train_acc is None else train_acc
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        metrics = {"train_loss": _f(train_loss), "train_acc": _f(train_acc), "val_loss": _f(val_loss),
                   "val_acc": _f(val_acc), "lr": _f(lr)}
        seconds = p.epoch_active_seconds()
        p.epoch_durations.append(seconds)
        p.history.append({"epoch": p.epoch, **metrics})
        p.epochs_done = p.epoch
        p.last_step_time = time.time()
        tags = {"train/loss": metrics["train_loss"], "train/acc": metrics["train_acc"],
                "val/loss": metrics["val_loss"], "val/acc": metrics["val_acc"], "lr": metrics["lr"]}
        values = {k: v for k, v in tags.items() if v is not None}
        values.update({k: float(v) for k, v in scalars.items()})
        if self.writer:
            self.writer.scalars(p.epoch, values)
        self.reporter.epoch_finished(p.epoch, p.total_epochs, metrics, seconds)
        if self.health is not None and self.is_writer:
            self._emit_alerts(self.health.on_epoch(epoch=p.epoch, step=p.global_step, history=p.history))
        self.log("INFO", f"Epoch {p.epoch}/{p.total_epochs} done: " + _metrics_line(metrics), echo=False)
        self._poke()
        return metrics

    def log(self, level: str, message: str, *, echo: bool = True) -> None:
        """A log record: terminal, the run's log (followed by the Health tab) and TensorBoard text."""
        level = level.upper()
        if level == "WARNING":
            self.progress.warnings += 1
        elif level == "ERROR":
            self.progress.errors += 1
        if echo:
            self.reporter.log(level, message)
        self.run.append_log(level, message, **({"rank": self.rank} if self.dist else {}))
        if self.writer:
            stamp = time.strftime("%H:%M:%S")
            self.writer.text(self.progress.global_step, "logs", f"`{stamp}` **{level}** {message}")

    @property
    def should_stop(self) -> bool:
        return self._stop_reason is not None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary with a checkpoint (for code that decides to stop)."""
        self._stop_wanted = self._stop_wanted or reason

    def state_dict(self) -> dict:
        """What a checkpoint keeps so a resumed run continues its progress, history and alerts."""
        p = self.progress
        return {
            "epochs_done": p.epochs_done, "epoch": p.epoch, "batch": p.batch, "global_step": p.global_step,
            "elapsed_s": p.active_seconds(), "started_at": p.started_at, "history": list(p.history),
            "epoch_durations": list(p.epoch_durations), "interventions": dict(p.interventions),
            "warnings": p.warnings, "errors": p.errors,
            "health": self.health.state_dict() if self.health is not None else None,
            "epoch_sums": self._epoch_sums(),
        }

    def _epoch_sums(self) -> list | None:
        """Loss and correct sums of the epoch in progress (a mid-epoch checkpoint), so the resumed
        epoch's means cover all of it. Read back only here, at checkpoint time. Under DDP the
        ranks' sums live apart: a resumed epoch averages the steps after the resume."""
        p = self.progress
        if p.epoch <= p.epochs_done or self.dist is not None:
            return None
        self._fold()
        loss, correct, count = self._resumed_sums or (0.0, None, 0)
        if self._loss_sum is not None:
            loss += self._loss_sum.item()
        if self._correct_sum is not None:
            correct = (correct or 0.0) + float(self._correct_sum.item())
        return [loss, correct, count + self._count]

    # ------------------------------------------------------------------ internals

    def _load_state(self, s: dict) -> None:
        p = self.progress
        p.epochs_done, p.epoch, p.global_step = s["epochs_done"], s.get("epoch", s["epochs_done"]), s["global_step"]
        p.batch = s.get("batch", 0) if p.epoch > p.epochs_done else 0
        p.elapsed_before, p.started_at = s.get("elapsed_s", 0.0), s.get("started_at", p.started_at)
        p.history, p.epoch_durations = list(s.get("history", [])), list(s.get("epoch_durations", []))
        p.interventions.update(s.get("interventions", {}))
        p.warnings, p.errors = s.get("warnings", 0), s.get("errors", 0)
        self._resumed_sums = s.get("epoch_sums") if p.batch else None

    def _log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """The logging step: one transfer to the host for everything read this step."""
        p = self.progress
        self._fold()
        if grad_norm is None and self.model is not None:
            grads = [q.grad for q in self.model.parameters() if q.grad is not None]
            if grads:
                grad_norm = torch.nn.utils.get_total_norm(grads)
        parts = [loss.float().reshape(()), self._loss_sum]
        if grad_norm is not None:
            parts.append(grad_norm.detach().float().reshape(()).to(loss.device))
        values = torch.stack(parts).tolist()
        mine = (self._rank_id, values[0], values[1], values[2] if len(values) > 2 else None)
        readings = self._gather(mine)
        p.last_step_time = time.time()
        if not self.is_writer:
            return
        finite = [r[1] for r in readings if math.isfinite(r[1])]
        step_loss = sum(finite) / len(finite) if finite else float("nan")
        self._last_step_loss = step_loss
        if self.dist:
            self._ranks = [{"rank": r[0], "step": p.global_step, "loss": r[1]} for r in readings]
        scalars = {"step/loss": step_loss}
        if mine[3] is not None:
            scalars["step/grad_norm"] = mine[3]
        if self.health is not None:
            self._emit_alerts(self.health.on_log_step(epoch=p.epoch, step=p.global_step, readings=readings))
        self.writer.scalars(p.global_step, scalars)

    def _sample_health(self) -> None:
        p = self.progress
        samples = self._gather((self._rank_id, self.health.read_sample()))
        if self.is_writer:
            self._record_health(*self.health.evaluate_sample(epoch=p.epoch, step=p.global_step, samples=samples))

    def _fold(self) -> None:
        """Add the steps reported since the last fold to the epoch's sums, on the device.

        A handful of kernels per logging step instead of two per step: the per-step cost of
        ``step()`` is then a list append. Nothing is read back here.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        by_n: dict[int, list[torch.Tensor]] = {}
        for loss, n, _ in pending:
            by_n.setdefault(n, []).append(loss.reshape(()))
        total = sum(torch.stack(ls).float().sum() * n for n, ls in by_n.items())
        self._loss_sum = total if self._loss_sum is None else self._loss_sum + total
        correct = [c.reshape(()) for _, _, c in pending if c is not None]
        if correct:
            c = torch.stack(correct).sum()
            self._correct_sum = c if self._correct_sum is None else self._correct_sum + c

    def _gather(self, item: Any) -> list:
        return [item] if self.dist is None else self.dist.all_gather(item)

    def _epoch_means(self) -> tuple[float, float | None]:
        """The epoch's mean train loss and accuracy (over all ranks under DDP): one read-back."""
        device = self._loss_sum.device if self._loss_sum is not None else "cpu"
        zero = torch.zeros((), device=device)
        loss = self._loss_sum if self._loss_sum is not None else zero
        correct = self._correct_sum if self._correct_sum is not None else zero
        sums = torch.stack([loss.double(), correct.double(),
                            torch.tensor(float(self._count), dtype=torch.float64, device=device)])
        if self.dist:
            self.dist.all_reduce_sum(sums)
        loss_sum, n_correct, count = sums.tolist()
        has_correct = self._correct_sum is not None
        if self._resumed_sums:  # the part of this epoch trained before a mid-epoch resume
            r_loss, r_correct, r_count = self._resumed_sums
            loss_sum, count = loss_sum + r_loss, count + r_count
            if r_correct is not None:
                n_correct, has_correct = n_correct + r_correct, True
        count = max(count, 1.0)
        return loss_sum / count, (n_correct / count if has_correct else None)

    def _emit_alerts(self, events: list[dict]) -> None:
        for alert in events:
            new = alert.pop("new", False)
            if self.is_writer:
                self.run.append_alert(alert)
            if alert.get("resolved"):
                self.log("INFO", f"resolved: {alert['message']}")
            elif new:
                level = "ERROR" if alert["severity"] == "critical" else "WARNING"
                self.log(level, f"[{alert['rule']}] {alert['message']}")
                if self.writer:
                    self.writer.text(alert.get("step") or 0, "alerts", f"**{alert['severity'].upper()} {alert['rule']}**: {alert['message']}")
                if alert.get("action") in ("stop", "pause"):
                    # Applied by the training thread at its next step boundary, never from here:
                    # this may run on the heartbeat thread.
                    with self._actions_lock:
                        self._pending_actions.append((alert["action"], alert["rule"]))
        if events:
            self._poke()

    def _record_health(self, scalars: dict, events: list[dict]) -> None:
        if scalars and self.writer:
            self.writer.scalars(self.progress.global_step, scalars)
        self._emit_alerts(events)

    def _poke(self) -> None:
        if self._heartbeat:
            self._heartbeat.poke()

    def _beat(self) -> None:
        if self.health is not None:
            self._emit_alerts(self.health.on_tick(self.progress, self.system.latest() if self.system else None))
        self._write_status()
        now = time.monotonic()
        if self.system is not None and self.writer and now >= self._next_system_scalars:
            self._next_system_scalars = now + SYSTEM_SCALARS_EVERY_S
            values = self.system.scalars()
            if values:
                self.writer.scalars(self.progress.global_step, values)

    def _write_status(self) -> None:
        if not self.is_writer:
            return
        health = self.health
        status = build_status(
            self.progress, system=self.system.latest() if self.system else None,
            alerts_active=health.active_count() if health is not None else 0,
            health_score=health.score(self.progress.warnings, self.progress.errors) if health is not None else 100,
            extra={"run_dir": str(self.run_dir), **({"ranks": self._ranks} if self._ranks else {})},
        )
        if self.dist and status["state"] not in FINAL_STATES:
            failures = self.run.rank_failures()
            if failures:  # a peer crashed while this rank may be blocked in a collective
                status["state"], status["message"] = "failed", failures[0]["message"]
        with self._lock:
            if self._final_written:  # a late heartbeat must not turn "completed" back into "training"
                return
            self.run.write_status(status)
            self._final_written = status["state"] in FINAL_STATES

    def _make_health(self):
        if self._health_settings is False:
            return None
        from tbhealth.instruments.watch import HealthWatch

        state = (self._resume_state or {}).get("health")
        return HealthWatch(self._health_settings, model=self.model, state=state)

    def _gpu_index(self) -> int | None:
        if self.model is None:
            return None
        try:
            dev = next(self.model.parameters()).device
        except StopIteration:
            return None
        return (dev.index or 0) if dev.type == "cuda" else None


def _f(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v.item() if hasattr(v, "item") else v)
    return v


def _metrics_line(m: dict) -> str:
    parts = []
    for k, v in m.items():
        if v is None:
            continue
        parts.append(f"{k}={v:.4g}" if math.isfinite(v) else f"{k}={v}")
    return ", ".join(parts)

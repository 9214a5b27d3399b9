"""``tbhealth.Monitor``: the object a training loop reports to, and takes orders from.

Any loop can use it (the config-driven Trainer is one user; ``examples/custom_loop.py`` is a
plain loop, the README's "Using tbhealth.Monitor in your own loop" shows its ten lines).

Cost on the training thread (see benchmarks/): ``step()`` appends the loss tensor (and the norm
it was given) to a list and does a few integer checks. Every ``log_every`` steps, and each of the
first ``health.dense_steps``, it folds the list on the device and reads the loss, the window's
aggregates and the gradient norm back in ONE transfer (the only host-device sync) and queues one
event. Health instruments exist only on sampled steps. The parts built here, each given what it
needs (dependencies point one way, down), are listed in :mod:`tbhealth.monitor`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tbhealth.distributed import DistContext
from tbhealth.health.alerts import AlertEvent
from tbhealth.health.ids import RuleId
from tbhealth.health.settings import HealthConfig
from tbhealth.instruments.watch import HealthWatch
from tbhealth.instruments.window import StepWindow
from tbhealth.monitor.checkpoints import CheckpointHook, plain, save_atomic
from tbhealth.monitor.control import ControlChannel
from tbhealth.monitor.controller import Controller, StepInterrupted
from tbhealth.monitor.epoch_metrics import current_lr, epoch_metrics
from tbhealth.monitor.epoch_sums import EpochSums
from tbhealth.monitor.heartbeat import Heartbeat
from tbhealth.monitor.progress import Progress
from tbhealth.monitor.readings import Readings
from tbhealth.monitor.reporter import Reporter, epoch_of, metrics_line
from tbhealth.monitor.setup import RESUME_HINT, check_arguments, device_of, run_folder
from tbhealth.monitor.sinks import RunLog, RunSink, Sink, record_alerts
from tbhealth.monitor.system import SystemSampler
from tbhealth.monitor.watchdog import Watchdog
from tbhealth.run.files import atomic_path
from tbhealth.run.rundir import RunDir
from tbhealth.run.states import State
from tbhealth.run.status import METRIC_TAGS


class Monitor:
    """Opens a run, records what the loop reports, watches its health and applies control requests.

    Args:
        logdir, name: where a new run goes (``name`` made unique); ignored when ``run_dir`` is given
            or when ``resume_state`` names a run folder that exists.
        total_epochs, total_steps: the planned epochs and/or optimizer steps, for progress and ETA;
            a run ends at whichever comes first (:meth:`epochs` stops there). Either may be None.
        model, optimizer: instrumented for gradient norms and health checks; the lr (optional).
        checkpoint_fn: ``fn(kind, state) -> Path`` (or ``fn(kind)``, or returning a ``Future`` of
            the file: see :mod:`tbhealth.monitor.checkpoints`) writes a checkpoint; ``kind`` is
            ``manual``, ``stop`` or what :meth:`save_checkpoint` was given; ``state`` is
            :meth:`state_dict`, to store for a resume. Without it, checkpoint requests are refused.
        health: the ``health:`` settings (dict or HealthConfig); ``False`` turns checks off.
        log_every: read values back and log per-step scalars every this many steps.
        resume_state: ``Monitor.state_dict()`` from a checkpoint: continues that run, in the same
            folder (the state names it), with its progress, history, alerts and intervention counts.
        resume_hint: how a stopped run of this loop continues (stop message, CLI answers).
        handle_signals: ``True``: SIGINT/SIGTERM/SIGHUP stop with a checkpoint (a second SIGINT
            aborts); ``"chain"``: and then call the handler found before (a framework's); ``False``: none.
        dist: a tbhealth.distributed.DistContext under torch.distributed: rank 0 writes the run's
            files; every rank logs, is measured, and obeys control at the same step.
        heartbeat_s: how often status, system readings and wall-clock rules refresh (s); keep it well
            under the 10 s after which readers call a run unresponsive.
    """

    def __init__(
        self, logdir: str | os.PathLike = "runs", name: str | None = None, *, total_epochs: int | None = None,
        total_steps: int | None = None, run_dir: str | os.PathLike | None = None, model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None, checkpoint_fn: Callable[..., Path] | None = None,
        health: Any = None, log_every: int = 50, resume_state: dict | None = None, resume_hint: str | None = None,
        verbose: bool = True, reporter: Reporter | None = None, handle_signals: bool | str = True,
        system_metrics: bool = True, dist: DistContext | None = None, heartbeat_s: float = 1.0,
    ):
        # bad arguments fail first: before a thread, a file or the run's directory exists
        check_arguments(total_epochs=total_epochs, total_steps=total_steps, heartbeat_s=heartbeat_s,
                        handle_signals=handle_signals)
        self.health = HealthWatch(health, model=model) if health is not False else None
        self.run = RunDir(run_folder(logdir, name, run_dir, resume_state))
        self.run_dir = self.run.path
        self.model, self.optimizer, self.dist = model, optimizer, dist
        self.log_every = max(1, int(log_every))
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist else (0, 1)
        self.is_writer = lead = self.rank == 0  # rank 0 writes the run's files: decided here, once
        self._handle_signals = handle_signals
        device = device_of(model)
        self.progress = p = Progress(run=self.run_dir.name, total_epochs=total_epochs, total_steps=total_steps,
                                     world_size=self.world_size, run_dir=str(self.run_dir.absolute()),
                                     device=device and str(device), resume_hint=resume_hint or RESUME_HINT)
        self._checkpoint = CheckpointHook(checkpoint_fn, self.state_dict, p)
        self.reporter = reporter or Reporter(enabled=verbose and lead)
        self.sink: Sink = RunSink(self.run) if lead else Sink()
        self._log = log = RunLog(self.run, p, self.sink, self.reporter, rank=self.rank if dist else None, lead=lead)
        gpu_index = (device.index or 0) if device is not None and device.type == "cuda" else None
        self.system = SystemSampler(heartbeat_s, gpu_index) if lead and system_metrics else None
        self._heartbeat = Heartbeat(p, self.sink, self.run, health=self.health, system=self.system,
                                    distributed=dist is not None, interval=heartbeat_s, report=log.write)
        self._watchdog = Watchdog(p, self.sink, health=self.health, system=self.system, record=self._record_alerts,
                                  interval=heartbeat_s, report=log.write)
        self._channel = ControlChannel(self.run) if lead else None  # rank 0 reads requests, every rank obeys
        self._controller = Controller(p, log=log, sink=self.sink, channel=self._channel, dist=dist,
                                      save=self._checkpoint, poke=self._heartbeat.poke, run_path=self.run_dir)
        self.sink.writes.on_disk_full = self._controller.request_stop  # nothing more fits: stop, checkpoint if it can
        self._window = StepWindow() if self.health is not None else None
        self.sums = EpochSums(dist, window=self._window)  # every step's loss also reaches the window
        #: each of the run's first steps logs, so a bad initialisation shows before it settles
        self._dense = self.health.cfg.dense_steps if self.health is not None and self.health.cfg.enabled else 0
        self._readings = Readings(p, self.sums, self.sink, model=model, health=self.health,
                                  judge=self.health if lead else None, dist=dist, record=self._record_alerts,
                                  window=self._window, note=lambda text: log.write("INFO", text, echo=False))
        self._started, self._closed, self._epochs_started, self._between_done = False, False, 0, False
        if resume_state:
            self.load_state_dict(resume_state)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, StepInterrupted):  # a health rule's stop on a hung step: as asked
            self.close(State.STOPPED.value, message=str(exc))
            return True
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("stopped", message="aborted by a second interrupt; no checkpoint written")
        else:
            self.fail(exc)
        return False

    def start(self) -> "Monitor":
        """Open the run: files and threads on rank 0, signal handlers, state ``training``."""
        self._started = True
        p = self.progress
        try:
            settings = self.health.cfg if self.health is not None else HealthConfig(enabled=False)
            self.sink.open(settings.model_dump(mode="json"),  # the Health tab judges with these
                           self.health.layer_names() if self.health is not None else None)
            stale = self._channel.reject_stale() if self._channel is not None else 0
            if stale:
                self.log("WARNING", f"rejected {stale} control request(s) sent while the run was not live")
            if self._handle_signals:
                self._controller.install_signals(chain=self._handle_signals == "chain")
            p.state = State.TRAINING.value
            if self.health is not None:  # the first step is sampled too
                self.health.before_step(p.global_step + 1)
            self.reporter.start(str(self.run_dir), p.total_epochs, p.epochs_done)
            self._heartbeat.write()
            if self.is_writer:  # the other ranks' sink drops everything: no thread to feed it
                for part in (self.system, self._heartbeat, self._watchdog):
                    if part is not None:
                        part.start()
        except BaseException as e:  # leave no thread, handler or "training" status behind
            self.fail(e)
            raise
        return self

    def close(self, state: str | None = None, message: str | None = None) -> None:
        """Finish the run: ``completed`` unless a stop was requested (then ``stopped``)."""
        if self._closed:
            return
        self._closed = True
        p = self.progress
        self._controller.end(state, message)
        if self.dist:  # every rank says where it ended: they must agree
            self.log("INFO", f"rank {self.rank} {p.state} at step {p.global_step}", echo=False)
        self._finish()

    def fail(self, exc: BaseException) -> None:
        """Record a crash: state ``failed`` and the traceback in the run's log."""
        if self._closed:
            return
        self._closed = True
        message = self._log.crash(exc)
        self.progress.state, self.progress.message = State.FAILED.value, message
        self._finish()

    def _finish(self) -> None:
        self._controller.restore_signals()
        if self.health is not None:
            self.health.close()
        for part in (self._watchdog, self._heartbeat, self.system):
            if part is not None:
                part.stop()
        self.reporter.close()
        self._heartbeat.run_once()  # the final state; a failure is logged, not raised over the cause
        self.sink.close(self.progress.global_step, self.progress.state)

    # ------------------------------------------------------------------ the loop's calls

    def epochs(self, batches_per_epoch: int | None = None) -> Iterator[int]:
        """Epoch numbers (1-based) still to train: until ``total_epochs`` are done or
        ``total_steps`` reached (neither planned: until a stop); ends early on a stop."""
        epoch = self.progress.epochs_done
        while self.progress.more_planned(epoch):
            epoch += 1
            self.start_epoch(epoch, batches_per_epoch)
            if self.should_stop:
                return
            yield epoch

    def start_epoch(self, epoch: int, batches_per_epoch: int | None = None, batch: int | None = None) -> None:
        """Begin epoch ``epoch`` (1-based), for loops that do not iterate :meth:`epochs`.

        Between two epochs it first calls :meth:`between_epochs`; when that stops the run, the
        epoch is not begun: check :attr:`should_stop`. ``batch``: batches of it already done; by
        default the position a mid-epoch :meth:`load_state_dict` restored for that epoch, else 0.
        """
        p = self.progress
        if self._epochs_started and not self._between_done:
            self.between_epochs()
        if self.should_stop:
            return
        if batch is None:
            batch = p.batch if not self._epochs_started and epoch == p.epoch > p.epochs_done else 0
        self._epochs_started, self._between_done = self._epochs_started + 1, False
        p.begin_epoch(epoch, batches_per_epoch, batch)
        self.sums.start(keep_resumed=bool(batch))
        self.reporter.epoch_started(epoch, batches_per_epoch)

    def between_epochs(self) -> None:
        """Apply what arrived since the last step (requests, signals, health actions; waits while
        paused) now, not one step into the next epoch: where a framework's checkpoints resume
        cleanly (Lightning's epoch-end hooks); the next epoch's start then applies nothing more.
        Check :attr:`should_stop` after."""
        self._controller.between_epochs()
        self._between_done = True

    def step(self, loss: torch.Tensor, *, n: int = 1, correct: torch.Tensor | None = None,
             grad_norm: torch.Tensor | None = None, lr: float | None = None) -> None:
        """Report one optimizer step: call after ``optimizer.step()`` and before ``zero_grad()``.

        ``loss`` is the batch's mean loss (a tensor: it is not read back unless this step logs),
        ``n`` the number of predictions it averages (the batch size; tokens for ``(N, T)`` sequence
        targets), ``correct`` how many of those ``n`` predictions were right (a tensor, optional;
        ``correct > n`` is refused at the epoch's end, where it is read back), ``grad_norm`` the
        global gradient norm **before clipping** if the loop has it (the value
        ``torch.nn.utils.clip_grad_norm_`` returns): a clipped norm is constant and hides an
        explosion. Every step's loss and ``grad_norm`` feed the health rules through device-side
        aggregates over the logging window (no sync). ``lr``: the learning rate this step used
        (default: the optimizer's, read on logging steps), logged as ``step/lr``. Returns at the
        step boundary: after applying control requests, and only once resumed when paused.
        """
        p = self.progress
        p.global_step += 1
        p.batch += 1
        loss = loss.detach()
        self.sums.add(loss, n, correct)
        health = self.health
        if health is not None:
            if grad_norm is not None:
                self._window.note_norm(grad_norm)
            if health.wants_first_loss:  # divergence compares with step 1's loss
                health.note_first_loss(loss)
        regular = p.global_step % self.log_every == 0
        if regular or p.global_step <= self._dense:  # the losses first: under DDP they name the rank
            rate = current_lr(self.optimizer, lr)
            self._readings.log_step(loss, grad_norm, {} if rate is None else {"step/lr": rate}, closes=regular)
        if health is not None:
            if health.armed:
                self._readings.sample(grad_norm)
            health.before_step(p.global_step + 1)
        self._controller.after_step(p.global_step)
        self.reporter.step(p.batch, self._readings.last_loss)

    def end_epoch(self, *, val_loss: float | None = None, val_acc: float | None = None, lr: float | None = None,
                  train_loss: float | None = None, train_acc: float | None = None, val_count: int | None = None,
                  **scalars: float) -> dict:
        """Report a finished epoch; train loss/accuracy default to the means of ``step()``'s values.

        ``val_count``: how many predictions ``val_acc`` was measured over; with it an accuracy gap
        is judged against the noise of a validation set that size (``overfitting``). An accuracy
        outside 0–1 is refused (logged, recorded as None): accuracies are fractions.
        ``lr`` defaults to the optimizer's rate *now*: after the epoch's last scheduler step (with
        a per-step scheduler, the rate the next step will use); call this before a per-epoch
        ``scheduler.step()`` or pass ``lr=`` to record the rate the epoch trained with.
        Returns the epoch's metrics (``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``,
        ``lr``; None where unknown). Extra keyword scalars are logged under their own names.
        """
        p = self.progress
        if self.health is not None:
            self._readings.close_window()
        train_loss, train_acc, train_count = self.sums.fill_in(train_loss, train_acc)
        metrics, refused = epoch_metrics(train_loss=train_loss, train_acc=train_acc, train_count=train_count,
                                         val_loss=val_loss, val_acc=val_acc, val_count=val_count,
                                         lr=current_lr(self.optimizer, lr))
        for why in refused:
            self.log("WARNING", f"epoch {p.epoch}: {why}")
        seconds = p.finish_epoch(metrics)
        values = {METRIC_TAGS[k]: v for k, v in metrics.items() if v is not None}
        self.sink.scalars(p.epoch, values | {k: float(v) for k, v in scalars.items()})
        self.reporter.epoch_finished(p.epoch, p.total_epochs, metrics, seconds)
        if self.health is not None and self.is_writer:  # rank 0 judges: the ranks' metrics are reduced
            counts = (int(train_count) if train_count else None, val_count)
            self._record_alerts(self.health.on_epoch(epoch=p.epoch, step=p.global_step, history=p.history,
                                                     counts=counts))
        self.log("INFO", f"Epoch {epoch_of(p.epoch, p.total_epochs)} done: " + metrics_line(metrics), echo=False)
        self._heartbeat.poke()
        return metrics

    def gradients_ready(self) -> None:
        """Call after ``backward()`` (and ``scaler.unscale_``), before clipping: sampled steps take
        their per-layer gradient norms now, not after clipping scaled them. No sync."""
        if self.health is not None:
            self.health.gradients_ready()

    def keep_alive(self) -> None:
        """Progress outside :meth:`step` (a validation batch, a slow checkpoint): tells the
        ``stalled`` rule the loop is alive. An attribute write; no sync, no I/O."""
        self.progress.last_step_time = time.time()

    def log(self, level: str, message: str, *, echo: bool = True) -> None:
        """A log record: terminal, the run's log (followed by the Health tab) and TensorBoard text."""
        self._log.write(level, message, echo=echo)

    def save_checkpoint(self, kind: str) -> Path | Future[Path] | None:
        """Write a checkpoint now through ``checkpoint_fn`` (e.g. ``last`` at an epoch's end), between
        steps; it becomes the status's ``last_checkpoint``. Returns what ``checkpoint_fn`` returned."""
        return self._checkpoint(kind)

    def save_atomic(self, obj: Any, name: str | os.PathLike) -> Path:
        """``torch.save(obj)`` as ``name`` in :attr:`checkpoint_dir` (or at ``name`` if absolute) via
        a temp file, ``fsync`` and a rename: never half a checkpoint, no symlink in the run followed."""
        return save_atomic(obj, self.checkpoint_dir / name, root=None if Path(name).is_absolute() else self.run_dir)

    def atomic_path(self, name: str | os.PathLike):
        """``with mon.atomic_path("x.ckpt") as tmp: writer(tmp)``: the same for a writer that takes a
        file name (Lightning's ``trainer.save_checkpoint``); see :func:`tbhealth.run.files.atomic_path`."""
        return atomic_path(self.checkpoint_dir / name, root=None if Path(name).is_absolute() else self.run_dir)

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary with a checkpoint (for code that decides to stop)."""
        self._controller.request_stop(reason)

    # -- where the run is (read-only) --
    should_stop = property(lambda self: self._controller.should_stop,
                           doc="True once a stop was applied (request, signal, health rule): leave the loop.")
    paused = property(lambda self: self._controller.paused, doc="True while paused (``step()`` is waiting).")
    state = property(lambda self: self.progress.state,
                     doc="The run's state: ``training``, ``paused``, ``stopped``, ``completed``, ``failed``, ...")
    global_step = property(lambda self: self.progress.global_step, doc="Optimizer steps so far (resumes included).")
    epochs_done = property(lambda self: self.progress.epochs_done, doc="Finished epochs.")
    history = property(lambda self: list(self.progress.history),
                       doc="One dict per finished epoch: ``epoch`` and the metrics :meth:`end_epoch` returned.")
    checkpoint_dir = property(lambda self: self.run.checkpoint_dir,
                              doc="``<run>/checkpoints``: where :meth:`save_atomic` puts a relative name.")

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        """What a checkpoint keeps so a resumed run continues its folder, progress, history and alerts.

        ``run_dir`` names the run (``Monitor(resume_state=...)`` reopens it); ``epochs_done``,
        ``epoch``, ``batch`` and ``global_step`` say where it is; a mid-epoch state also holds the
        epoch's sums (one read-back, here). Plain JSON types only: ``torch.save``, ``json.dump``
        and a framework's JSON state files all keep it as it is.
        """
        p = self.progress
        return plain({**p.state_dict(), "health": self.health.state_dict() if self.health is not None else None,
                      "epoch_sums": self.sums.snapshot() if p.epoch > p.epochs_done else None})

    def load_state_dict(self, state: dict, *, batch: int | None = None) -> None:
        """Continue the run a :meth:`state_dict` describes; call before :meth:`start`.

        ``batch``: where to continue in the interrupted epoch, counted in this loop's batches when
        they differ from the saved run's (another batch size or number of processes); by default
        the saved position. The run folder is chosen by the constructor: pass the state there as
        ``resume_state`` (or ``run_dir=``) to continue in the same folder.
        """
        if self._started:
            raise RuntimeError("Monitor.load_state_dict() must be called before start()")
        self.progress.load_state_dict(state, batch)
        self.sums.resume(state.get("epoch_sums") if self.progress.batch else None)
        if self.health is not None and state.get("health"):
            self.health.load_state_dict(state["health"])

    # ------------------------------------------------------------------ internals

    def _record_alerts(self, events: list[AlertEvent]) -> None:
        """Record alert events (training thread or watchdog); actions wait for the next boundary."""
        for action, rule in record_alerts(events, self.sink, self._log):
            if rule == RuleId.STALLED.value and action == "stop":  # no step boundary is coming
                self._controller.interrupt(f"health rule {rule}: action stop", self.health.training_thread)
            self._controller.queue_action(action, rule)
        if events:
            self._heartbeat.poke()


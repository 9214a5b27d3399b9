"""tbhealth for Lightning: ``Trainer(callbacks=[TBHealthCallback()])``.

Install with ``pip install 'tbhealth[lightning]'``. Works with ``lightning.pytorch`` (and with the
standalone ``pytorch_lightning`` package when ``lightning`` is not installed).

What it does, hook by hook (Lightning 2.x order within one optimizer step):

- ``on_train_start`` opens the run in ``<trainer.log_dir>/<name>`` (next to the logger's own
  events, so one ``tbhealth board lightning_logs`` shows both), or continues the run saved in the
  checkpoint Lightning resumes from. Lightning has registered its SIGTERM handler by then; the
  monitor's handler runs and then calls Lightning's (``handle_signals="chain"``: chained, not
  replaced). A SIGTERM thus stops at the step boundary with a checkpoint and Lightning then
  exits its own way (``SIGTERMException``): the run reads ``stopped``.
- ``on_train_batch_end`` of every micro-batch adds its loss (``training_step``'s, un-scaled from
  Lightning's division by ``accumulate_grad_batches``), its batch size and an optional
  ``"correct"`` entry of the step's output dict to the optimizer step's sums (on the device).
  When ``trainer.global_step`` moved, an optimizer step finished: the monitor gets one ``step``.
- ``on_before_optimizer_step`` runs after backward, AMP unscaling and before gradient clipping:
  the learning rate of the step, on sampled steps the per-layer gradient norms
  (``Monitor.gradients_ready``) and, on the monitor's logging steps only, the pre-clip gradient
  norm (a device tensor, read back by the monitor with the loss in one transfer) are taken there.
- A stop (CLI, Health tab, a health rule, Ctrl-C) sets ``trainer.should_stop`` after the
  checkpoint; pause blocks at the step boundary; "checkpoint now" runs ``trainer.save_checkpoint``
  (on every rank: Lightning's save is collective) into the run's ``checkpoints/`` folder, and is
  acknowledged once the file is there.
- The epoch ends with validation's ``val_loss``/``val_acc`` (``self.log`` names, configurable)
  in ``on_validation_end`` when validation closes the epoch (before ``ModelCheckpoint``, which
  Lightning runs last, so its checkpoint holds the finished epoch), else in ``on_train_epoch_end``.
- Under DDP (any strategy on torch.distributed) rank 0 writes, the run folder is broadcast from
  rank 0, and every rank applies a control request at the same step.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from tbhealth.integrations._common import (MicroBatches, agreed_run_dir, batch_size, dist_context,
                                           finish_stopped_epoch, require)
from tbhealth.monitor import Monitor


def _lightning():
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        return require("pytorch_lightning", "lightning", "tbhealth.integrations.lightning")


L = _lightning()
RESUME_HINT = ("continue it with `trainer.fit(model, ckpt_path=...)` on its stop checkpoint (in the run's "
               "checkpoints/ folder)")


class TBHealthCallback(L.Callback):
    """Monitor a Lightning run with tbhealth: progress, health alerts, pause/resume/stop/checkpoint.

    Args:
        name: the run folder's name under ``trainer.log_dir`` (``default_root_dir`` without a logger).
        health: the ``health:`` settings of the config (a dict), ``None`` for the defaults, ``False`` off.
        log_every: read the loss and gradient norm back every this many optimizer steps.
        val_loss, val_acc: names of the logged validation metrics (``self.log(...)``) for the epoch.
        correct_key: the key of ``training_step``'s output dict holding the batch's number of right
            predictions (a tensor); without it there is no train accuracy.
        verbose: the monitor's terminal lines on rank 0 (Lightning's progress bar is separate).
        system_metrics: sample CPU/RAM/disk/GPU on rank 0.
    """

    def __init__(self, name: str = "tbhealth", *, health: Any = None, log_every: int = 50,
                 val_loss: str = "val_loss", val_acc: str = "val_acc", correct_key: str = "correct",
                 verbose: bool = True, system_metrics: bool = True):
        self.name, self.health, self.log_every = name, health, log_every
        self.val_keys, self.correct_key = (val_loss, val_acc), correct_key
        self.verbose, self.system_metrics = verbose, system_metrics
        self.monitor: Monitor | None = None
        self._saved: dict | None = None  # from load_state_dict: the run a resume continues
        self._window = MicroBatches()
        self._grad_norm: torch.Tensor | None = None
        self._lr: float | None = None
        self._steps_seen = 0
        self._per_epoch: int | None = None
        self._epoch_open = False

    # ------------------------------------------------------------------ run lifecycle

    def on_train_start(self, trainer, pl_module) -> None:
        base = trainer.log_dir if trainer.logger is not None else trainer.default_root_dir
        run_dir = agreed_run_dir(base, self.name, self._saved, lead=trainer.is_global_zero,
                                 broadcast=trainer.strategy.broadcast)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = Monitor(
            run_dir=run_dir, total_epochs=_planned(trainer.max_epochs), total_steps=_planned(trainer.max_steps),
            model=pl_module, optimizer=optimizer, checkpoint_fn=lambda kind: self._checkpoint(trainer, kind),
            health=self.health, log_every=self.log_every, resume_state=self._saved, resume_hint=RESUME_HINT,
            verbose=self.verbose, system_metrics=self.system_metrics, dist=dist_context(pl_module.device),
            handle_signals="chain",
        )
        self.monitor.start()
        self._steps_seen = trainer.global_step
        batches = trainer.num_training_batches
        accumulate = trainer.accumulate_grad_batches
        self._per_epoch = -(-int(batches) // accumulate) if batches != float("inf") else None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Lightning's SIGTERM exit and a second Ctrl-C end the run as stopped; anything else failed."""
        mon = self.monitor
        if mon is None:
            return
        if isinstance(exception, KeyboardInterrupt):
            mon.close("stopped", message="aborted by a second interrupt")
        elif isinstance(exception, SystemExit):  # Lightning's SIGTERMException, after the monitor's stop
            mon.close("stopped", message=None if mon.should_stop else "Lightning ended on SIGTERM before a step "
                      "boundary: no stop checkpoint")
        else:
            mon.fail(exception)

    # ------------------------------------------------------------------ epochs and steps

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._open_epoch(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not (self._epoch_open or self.monitor.should_stop):  # resumed mid-epoch: no on_train_epoch_start
            self._open_epoch(trainer)

    def _open_epoch(self, trainer) -> None:
        """Begin the epoch (a resumed one at the position its checkpoint's monitor state holds),
        unless what arrived during validation stopped the run: then Lightning stops too."""
        mon, epoch = self.monitor, trainer.current_epoch + 1
        finish_stopped_epoch(mon, epoch, self._per_epoch, lambda: self._end_epoch(trainer))
        mon.start_epoch(epoch, self._per_epoch)
        self._epoch_open = not mon.should_stop
        if mon.should_stop:
            trainer.should_stop = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """After backward and AMP unscaling, before clipping: the step's learning rate, on sampled
        steps the per-layer norms and, when the coming step logs, the pre-clip gradient norm (a
        device tensor; no sync here)."""
        self._lr = optimizer.param_groups[0]["lr"]
        mon = self.monitor
        if mon is None:
            return
        mon.gradients_ready()
        if (mon.global_step + 1) % mon.log_every == 0:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.monitor is None or not isinstance(loss, torch.Tensor):
            return  # training_step returned None: Lightning skipped the batch
        correct = outputs.get(self.correct_key) if isinstance(outputs, dict) else None
        self._window.add(loss * trainer.accumulate_grad_batches, batch_size(batch), correct)
        if trainer.global_step == self._steps_seen:
            return  # gradients still accumulating
        self._steps_seen = trainer.global_step
        self._step(trainer)

    def _step(self, trainer) -> None:
        mon, step = self.monitor, self._window.take()
        mon.step(step["loss"], n=step["n"], correct=step["correct"], grad_norm=self._grad_norm, lr=self._lr)
        self._grad_norm = None
        if mon.should_stop:
            trainer.should_stop = True

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self.monitor is not None and not trainer.sanity_checking:
            self.monitor.keep_alive()  # a long validation is progress, not a stalled run

    def on_validation_end(self, trainer, pl_module) -> None:
        mon = self.monitor
        if mon is None or trainer.sanity_checking or not self._epoch_open:
            return
        if self._per_epoch is not None and mon.progress.batch >= self._per_epoch:
            self._end_epoch(trainer)  # validation closes the epoch: before ModelCheckpoint saves

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_open:
            self._end_epoch(trainer)
        # What arrived during the epoch's end applies here, where Lightning takes its own epoch-end
        # checkpoints: a stop checkpoint from the next epoch's start resumes *after* that epoch.
        self.monitor.between_epochs()
        if self.monitor.should_stop:
            trainer.should_stop = True

    def _end_epoch(self, trainer) -> None:
        self._epoch_open = False
        if self.monitor.should_stop:
            return  # a stopped epoch is not a finished one
        metrics = trainer.callback_metrics
        val = [metrics.get(key) for key in self.val_keys]
        self.monitor.end_epoch(val_loss=val[0], val_acc=val[1], lr=self._lr)  # the rate of the epoch's last step

    # ------------------------------------------------------------------ checkpoints and resume

    def _checkpoint(self, trainer, kind: str) -> Path:
        """``trainer.save_checkpoint`` into the run's ``checkpoints/``, renamed into place once
        complete and ``fsync``-ed (``Monitor.atomic_path``): it exists when the request is answered.

        Called at the same step on every rank (Lightning's save is a collective; rank 0 writes
        the path it broadcasts). The file holds this callback's state, so
        ``trainer.fit(..., ckpt_path=file)`` continues the same tbhealth run.
        """
        mon = self.monitor
        name = f"{kind}-step-{mon.global_step:06d}.ckpt"
        with mon.atomic_path(name) as tmp:
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero and not tmp.exists():  # an asynchronous CheckpointIO: not on disk yet
                raise RuntimeError(f"trainer.save_checkpoint() returned before writing {tmp}")
        return mon.checkpoint_dir / name

    def state_dict(self) -> dict:
        """The monitor's state (it names the run folder): Lightning stores it in its checkpoints."""
        return self.monitor.state_dict() if self.monitor is not None else dict(self._saved or {})

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = dict(state_dict) if state_dict else None


def _planned(limit: int | None) -> int | None:
    """Lightning's ``max_epochs``/``max_steps``, with its ``-1`` and ``None`` (no limit) as None."""
    return limit if limit is not None and limit > 0 else None


__all__ = ["TBHealthCallback"]

"""tbhealth for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[TBHealthCallback()])``.

Install with ``pip install 'tbhealth[transformers]'`` (transformers with its torch extra, which
brings accelerate, the Trainer's engine).

Where each value comes from, and how often (the Trainer hands callbacks neither the loss nor the
gradients before clipping):

- **loss, every optimizer step**: a forward hook on the model reads ``outputs.loss`` of each
  training micro-batch (on the device: no sync) and combines the step's micro-batches the way
  the Trainer does for its own logged ``loss`` (the mean, or the sum when the model normalised by
  ``num_items_in_batch``). A planted NaN is seen, unlike the logged ``loss``, which
  ``logging_nan_inf_filter`` (on by default) replaces by an average. A model that returns no
  ``loss`` (a custom ``compute_loss``) falls back to the logged ``loss``, every ``logging_steps``.
- **train accuracy**: for sequence classification (logits ``(N, C)``, labels ``(N,)``), from the
  same hook; ``n`` is the number of sequences.
- **gradient norm, every ``logging_steps``**: the ``grad_norm`` the Trainer logs, which it computes
  before clipping (``max_grad_norm``). The monitor's logging steps are the Trainer's (``log_every``
  defaults to ``logging_steps``), and on those the monitor's step is completed in ``on_log``.
- **learning rate, every step**: the optimizer's, in ``on_optimizer_step`` (before the scheduler
  steps), logged as ``step/lr`` on the monitor's logging steps.
- **per-layer gradient norms, on sampled steps**: taken in ``on_pre_optimizer_step``, i.e. *after*
  the Trainer clipped (it offers no hook in between); the Trainer zeroes gradients before
  ``on_step_end``, so this is the last moment they exist.
- **validation**: ``eval_loss`` / ``eval_accuracy`` from ``on_evaluate``; with
  ``eval_strategy="epoch"`` the epoch is recorded after its evaluation.

Control goes through ``TrainerControl``: stop sets ``should_training_stop`` (and ``should_save``,
so the stop leaves a ``checkpoint-N``), "checkpoint now" sets ``should_save`` and hands the
monitor a ``Future`` that ``on_save`` completes once the Trainer has written ``checkpoint-N``:
the request is acknowledged then, not before. Pause waits at the step boundary. The run folder
is ``<output_dir>/runs/<name>`` (``runs/`` is where the Trainer's own TensorBoard logs go;
``$TENSORBOARD_LOGGING_DIR`` or ``args.logging_dir`` where set). The monitor's state (JSON-safe)
rides in ``trainer_state.json`` (``ExportableState``), so
``trainer.train(resume_from_checkpoint=...)`` continues the same tbhealth run.
"""

from __future__ import annotations

import atexit
import os
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from tbhealth.integrations._common import (MicroBatches, agreed_run_dir, batch_size, dist_context,
                                           finish_stopped_epoch, require)
from tbhealth.monitor import Monitor
from tbhealth.monitor.checkpoints import plain

for _needed in ("transformers", "accelerate"):  # the Trainer runs on accelerate
    require(_needed, "transformers", "tbhealth.integrations.transformers")
from transformers.trainer_callback import ExportableState, TrainerCallback  # noqa: E402

RESUME_HINT = "continue it with `trainer.train(resume_from_checkpoint=True)` (the same output_dir)"
DEFAULT_LOG_EVERY = 50  # when the Trainer does not log by steps


class TBHealthCallback(TrainerCallback, ExportableState):
    """Monitor a Hugging Face ``Trainer`` run with tbhealth.

    Args:
        name: the run folder's name under ``<output_dir>/runs`` (made unique).
        health: the ``health:`` settings of the config (a dict), ``None`` for the defaults, ``False`` off.
        log_every: the monitor's read-back cadence in optimizer steps; default: ``logging_steps``,
            so the pre-clip gradient norm the Trainer logs lands on the monitor's logging steps.
        verbose: the monitor's terminal lines on the main process.
        system_metrics: sample CPU/RAM/disk/GPU on the main process.
    """

    def __init__(self, name: str = "tbhealth", health: Any = None, log_every: int | None = None,
                 verbose: bool = True, system_metrics: bool = True):
        self.name, self.health, self.log_every = name, health, log_every
        self.verbose, self.system_metrics = verbose, system_metrics
        self.monitor: Monitor | None = None
        self._saved: dict | None = None
        self._window = MicroBatches()
        self._summed = False  # the model normalised its loss by the whole step's items
        self._pending: dict | None = None  # the optimizer step waiting for its log (grad_norm)
        self._control = None
        self._save_wanted: tuple[Future, int] | None = None  # a "checkpoint now" and its step, until on_save
        self._output_dir = "."
        self._val: dict = {}
        self._last_lr: float | None = None  # the rate the last optimizer step trained with
        self._epoch_done = False
        self._hook = None

    # ------------------------------------------------------------------ ExportableState

    def state(self) -> dict:
        """What ``trainer_state.json`` keeps: the constructor's arguments and the monitor's state."""
        health = self.health.model_dump(mode="json") if hasattr(self.health, "model_dump") else plain(self.health)
        args = {"name": self.name, "health": health, "log_every": self.log_every,
                "verbose": self.verbose, "system_metrics": self.system_metrics}
        saved = self.monitor.state_dict() if self.monitor is not None else self._saved  # JSON-safe
        return {"args": args, "attributes": {"_saved": saved}}

    def _resumed(self, state) -> dict | None:
        """The monitor state of the checkpoint the Trainer resumed from (whether or not
        ``restore_callback_states_from_checkpoint`` rebuilt this callback from it)."""
        if self._saved or state.global_step == 0:
            return self._saved
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        stored = stored[0] if isinstance(stored, list) and stored else stored
        return ((stored or {}).get("attributes") or {}).get("_saved")

    # ------------------------------------------------------------------ run lifecycle

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        saved = self._resumed(state)
        dist = dist_context(args.device)
        base = (os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
                or os.path.join(args.output_dir, "runs"))
        run_dir = agreed_run_dir(base, self.name, saved, lead=dist is None or dist.is_main,
                                 broadcast=dist.broadcast if dist else lambda path: path)
        by_steps = args.max_steps is not None and args.max_steps > 0
        logs_steps = str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps"
        self._output_dir = args.output_dir
        self.monitor = Monitor(
            run_dir=run_dir, total_epochs=None if by_steps else int(-(-state.num_train_epochs // 1)),
            total_steps=state.max_steps or None, model=model, optimizer=optimizer, checkpoint_fn=self._checkpoint,
            health=self.health, resume_state=saved, resume_hint=RESUME_HINT, verbose=self.verbose,
            log_every=self.log_every or (int(state.logging_steps) if logs_steps else DEFAULT_LOG_EVERY),
            system_metrics=self.system_metrics, dist=dist,
        )
        self.monitor.start()
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        _watch_for_crash(self)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._saved_or_not(None)  # a request the Trainer never saved for is answered, not awaited
        if self.monitor is not None:
            self.monitor.fail(exc) if exc is not None else self.monitor.close()

    # ------------------------------------------------------------------ epochs

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        per_epoch = -(-len(train_dataloader) // args.gradient_accumulation_steps) if train_dataloader else None
        # state.epoch is fractional (1.43 after a mid-epoch resume); the monitor state holds the position
        epoch = int(state.epoch or 0) + 1
        finish_stopped_epoch(self.monitor, epoch, per_epoch, self._end_epoch)
        self.monitor.start_epoch(epoch, per_epoch)
        self._epoch_done, self._val = False, {}

    def on_epoch_end(self, args, state, control, **kwargs):
        self._flush()
        self._epoch_done = True
        if not control.should_evaluate:  # else the epoch is recorded with its evaluation
            self._end_epoch()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        self._val = {"val_loss": metrics.get("eval_loss"), "val_acc": metrics.get("eval_accuracy")}
        if self._epoch_done:
            self._end_epoch()

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.keep_alive()  # a long evaluation is progress, not a stalled run

    def _end_epoch(self) -> None:
        self._epoch_done = False
        if not self.monitor.should_stop:  # a stopped epoch is not a finished one
            self.monitor.end_epoch(**self._val, lr=self._last_lr)  # the rate of the epoch's last step

    # ------------------------------------------------------------------ steps

    def _on_forward(self, module, args, kwargs, output) -> None:
        """Every training micro-batch: its loss (and right predictions) added on the device."""
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not module.training or not isinstance(loss, torch.Tensor):
            return
        self._summed = kwargs.get("num_items_in_batch") is not None
        self._window.add(loss, batch_size(kwargs) if kwargs else batch_size(args), _correct(output, kwargs))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is not None:  # after clipping (no hook before it); gradients exist until zero_grad
            self.monitor.gradients_ready()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._flush()
        step = self._window.take() if self._window else {"loss": None, "n": 0, "correct": None}
        if step["loss"] is not None and self._summed:  # sum, not mean, of pre-normalised micro-batches
            step["loss"] = step["loss_sum"]
            if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
                step["loss"] = step["loss"] * args.world_size
        step["lr"] = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        self._pending = step

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_log:  # else the step completes in on_log, with the Trainer's grad_norm
            self._flush(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self._pending is not None and "loss" in logs:
            self._flush(control, grad_norm=logs.get("grad_norm"), logged_loss=logs["loss"])

    def _flush(self, control=None, grad_norm: float | None = None, logged_loss: float | None = None) -> None:
        step, self._pending = self._pending, None
        if step is None:
            return
        loss = step["loss"]
        if loss is None:  # the model returned no loss: the Trainer's logged one (or a hold)
            loss = torch.tensor(float("nan") if logged_loss is None else logged_loss)
        self._control = control
        mon = self.monitor
        self._last_lr = step["lr"]
        mon.step(loss, n=max(step["n"], 1), correct=step["correct"], lr=step["lr"],
                 grad_norm=None if grad_norm is None else torch.tensor(float(grad_norm)))
        if mon.should_stop and control is not None:
            control.should_training_stop = True
            control.should_save = True

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, kind: str) -> Path | Future:
        """Ask the Trainer to save at this step (``should_save``): it writes ``checkpoint-N``
        right after the callbacks of this step return. A ``manual`` request gets a future that
        :meth:`on_save` completes, so it is acknowledged once the folder is written; the stop's
        checkpoint is written before the Trainer leaves its loop, so its name is answered now (the
        monitor would wait for a future here, inside the very callback the save comes after)."""
        if self._control is not None:
            self._control.should_save = True
        path = Path(self._output_dir) / f"checkpoint-{self.monitor.global_step}"
        if kind == "stop":
            return path
        self._saved_or_not(None)
        self._save_wanted = (Future(), self.monitor.global_step)
        return self._save_wanted[0]

    def on_save(self, args, state, control, **kwargs):
        """The Trainer wrote ``checkpoint-<global_step>`` (model, optimizer, trainer_state.json)."""
        if self._save_wanted is not None and self._save_wanted[1] == state.global_step:
            self._saved_or_not(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def _saved_or_not(self, path: Path | None) -> None:
        """Complete the pending request's future with the folder written, or fail it (None)."""
        wanted, self._save_wanted = self._save_wanted, None
        if wanted is None or wanted[0].done():
            return
        if path is None:
            wanted[0].set_exception(RuntimeError(f"the Trainer did not save at step {wanted[1]}"))
        else:
            wanted[0].set_result(path)


def _correct(output: Any, kwargs: dict) -> torch.Tensor | None:
    """Right predictions of a classification batch: logits (N, C) against labels (N,)."""
    logits, labels = getattr(output, "logits", None), kwargs.get("labels")
    if not (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return None
    if labels.dim() != 1 or logits.dim() != 2 or labels.is_floating_point() or len(labels) != len(logits):
        return None
    return (logits.detach().argmax(-1) == labels).sum()


def _watch_for_crash(callback: TBHealthCallback) -> None:
    """The Trainer has no exception hook for callbacks: an exception out of ``train()`` is seen
    by ``sys.excepthook`` (uncaught) or, if the program catches it, at exit; either marks the run
    failed instead of leaving it ``training`` until its heartbeat goes stale."""
    previous = sys.excepthook

    def excepthook(kind, exc, tb):
        callback._finish(exc)
        previous(kind, exc, tb)

    sys.excepthook = excepthook
    atexit.register(lambda: callback._finish(RuntimeError("the program ended inside Trainer.train()")))


__all__ = ["TBHealthCallback"]

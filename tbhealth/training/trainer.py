"""The config-driven trainer behind ``tbhealth train``: one user of :class:`tbhealth.Monitor`.

It builds data, model, loss, optimizer and scheduler from the config, trains and validates each
epoch, and reports to the monitor through its public API only (the same calls any loop makes);
it never writes TensorBoard data itself. The step keeps everything on the device (loss, correct
predictions): the monitor decides when to read back. The monitor decides when a checkpoint is
due (requests, stops) and calls :meth:`Trainer.save_checkpoint` with its own state to store; the
trainer snapshots it and a background writer (:mod:`tbhealth.training.checkpoint_writer`) puts it
on disk, so the training thread never waits for ``torch.save``.
"""

from __future__ import annotations

import contextlib
import random
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from tbhealth.training import checkpoint as ckpt
from tbhealth.training import registry
from tbhealth.training.checkpoint_writer import CheckpointWriter
from tbhealth.training.config import Config, dump_config
from tbhealth.distributed import DistContext
from tbhealth.monitor import Monitor
from tbhealth.monitor.events import Mark
from tbhealth.monitor.orphans import drop_orphaned_scalars
from tbhealth.monitor.sinks import is_disk_full
from tbhealth.run.files import write_text_atomic
from tbhealth.run.rundir import RunDir
from tbhealth.run.states import State

LR_EPS = 1e-12
#: How long a checkpoint's writer waits for the TensorBoard events it covers to reach the disk.
EVENTS_WAIT_S = 30.0


class EpochOrder(Sampler[int]):
    """A shuffled order fixed by (seed, epoch), optionally skipping what a resumed run already did.

    Tying the order to the epoch number is what lets a run stopped mid-epoch resume on exactly
    the batches it had not seen, and two runs with one seed see the same batches.
    """

    def __init__(self, n: int, seed: int, epoch: int, skip: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip
        self.rank, self.world_size = rank, world_size

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()[self.skip:]  # skip: samples done, all ranks
        if self.world_size > 1:  # pad to a multiple of world size, then stride, like DistributedSampler
            total = -(-len(order) // self.world_size) * self.world_size
            order = (order + order[: total - len(order)])[self.rank:total:self.world_size]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False, verbose: bool = True,
                 dist: DistContext | None = None):
        self.cfg, self.run, self.dist = cfg, RunDir(run_dir), dist
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist else (0, 1)
        saved = self._load_latest() if resume else None
        self._orphans = self._tidy_for_resume(saved) if saved and self.rank == 0 else 0
        # a drawn seed (seed: null) is kept in the checkpoint: a resumed run splits and shuffles alike
        self.seed = cfg.seed if cfg.seed is not None else (
            saved["seed"] if saved else int(torch.initial_seed() % 2**31))
        if dist is not None:  # every rank must shuffle alike: rank 0's seed wins
            self.seed = dist.broadcast(self.seed)
        seed_everything(self.seed)
        self.device = dist.device if dist else pick_device(cfg.device)
        self.bundle = registry.build_data(cfg, seed=self.seed)  # the drawn seed: a resume gets the same split
        self.classification = self.bundle.task == "classification"
        self.model = registry.build_model(cfg, self.bundle).to(self.device)
        self.net = self._wrap(self.model)
        self.loss_fn = registry.build_loss(cfg)
        self.optimizer = registry.build_optimizer(cfg, self.model.parameters())
        self.batch_size = cfg.data.batch_size
        self.steps_per_epoch = -(-self._shard_len() // (self.batch_size * cfg.accumulate_steps))
        self.scheduler = registry.build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.plateau = registry.is_plateau(self.scheduler)
        self.amp_dtype = (torch.float16 if self.device.type == "cuda" else torch.bfloat16) if cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and self.device.type == "cuda")
        self.ckpts = ckpt.CheckpointManager(self.run, keep_last=cfg.checkpoint.keep_last)
        self.writer = CheckpointWriter(self.run.path)  # rank 0's checkpoints, written off the training thread
        self.best: float | None = None
        self._skip = 0  # samples of the first epoch already trained before a mid-epoch resume
        if saved:
            self._restore(saved)
        if self.rank == 0:
            write_text_atomic(self.run.config_path, dump_config(cfg))
        self.monitor = Monitor(
            run_dir=self.run.path, total_epochs=cfg.epochs, model=self.model, optimizer=self.optimizer,
            checkpoint_fn=self.save_checkpoint, health=cfg.health, log_every=cfg.logging.every_steps,
            verbose=verbose, dist=dist, resume_hint=f"continue it with `tbhealth train {self.run.config_path} --logdir "
            f"{self.run.path.parent} --name {self.run.path.name} --resume` (train longer: add `--set epochs=N`)",
        )
        if saved:  # progress is counted in this job's steps: the world size may have changed
            self.monitor.load_state_dict(saved["monitor"], batch=self._skip // self._samples_per_step())
        self._resumed_from = saved

    # ------------------------------------------------------------------ the recipe

    def fit(self) -> str:
        """Train to the configured number of epochs (or a stop); returns the final state."""
        mon = self.monitor
        with mon:
            if self._resumed_from is not None:
                dropped = f"; dropped {self._orphans} TensorBoard point(s) written after that checkpoint" if self._orphans else ""
                mon.log("INFO", f"resumed from step {mon.global_step}, epoch {mon.epochs_done} done{dropped}")
            mon.log("INFO", f"training {type(self.model).__name__} on {self.device} "
                    f"({self._param_count():,} parameters, {self.steps_per_epoch} steps/epoch)")
            with self.writer.draining():  # the run ends once its checkpoints are on disk
                for epoch in mon.epochs(batches_per_epoch=self.steps_per_epoch):
                    self.train_epoch(epoch)
                    if mon.should_stop:
                        break
                    self.end_epoch(epoch)
            if mon.sink.writes.disk_full:  # stopped because nothing more fits: a failure, not a user's stop
                mon.close(State.FAILED.value, mon.sink.writes.disk_full)
        return mon.state

    def train_epoch(self, epoch: int) -> None:
        mon, cfg = self.monitor, self.cfg
        self.net.train()
        skip, self._skip = self._skip, 0
        loader = self._loader(self.bundle.train, EpochOrder(len(self.bundle.train), self.seed, epoch, skip,
                                                            self.rank, self.world_size))
        accum, micro, loss_acc, correct_acc, n_acc = cfg.accumulate_steps, 0, None, None, 0
        for x, y in loader:
            loss, correct = self.forward_backward(x, y, scale=1.0 / accum)
            micro += 1
            loss_acc = loss if loss_acc is None else loss_acc + loss
            if correct is not None:
                correct_acc = correct if correct_acc is None else correct_acc + correct
            n_acc += self._predictions(y)
            if micro == accum:
                grad_norm = self.optimizer_step()
                mon.step(loss_acc / micro, n=n_acc, correct=correct_acc, grad_norm=grad_norm)
                self.optimizer.zero_grad(set_to_none=True)
                micro, loss_acc, correct_acc, n_acc = 0, None, None, 0
                if mon.should_stop:
                    return
        if micro:  # the epoch's last, short accumulation window
            grad_norm = self.optimizer_step()
            mon.step(loss_acc / micro, n=n_acc, correct=correct_acc, grad_norm=grad_norm)
            self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float):
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            out = self._fit_shape(self.net(x), y)
            loss = self.loss_fn(out, y)
        scaled = loss if scale == 1.0 else loss * scale  # one batch per step: no multiply kernel
        (self.scaler.scale(scaled) if self.scaler.is_enabled() else scaled).backward()
        return loss.detach(), self._correct(out, y)

    @staticmethod
    def _fit_shape(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A (N, 1) prediction for (N,) targets (scalar regression, binary logits) is squeezed."""
        return out.squeeze(1) if out.dim() == 2 and out.shape[1] == 1 and y.dim() == 1 else out

    def _predictions(self, y: torch.Tensor) -> int:
        """How many predictions a batch's loss averages and :meth:`_correct` counts: one per class
        index (tokens for (N, T) sequence targets), one per sample for float and regression targets."""
        return y.numel() if self.classification and not y.is_floating_point() else len(y)

    def _correct(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Right predictions in the batch, on the device: argmax for class indices, a 0.5
        threshold on logits for float (binary / multi-label) targets, all labels right."""
        if not self.classification:
            return None
        if y.is_floating_point():
            hit = (out.detach() > 0) == (y > 0.5)
            return hit.reshape(len(y), -1).all(1).sum()
        return (out.argmax(1) == y).sum()

    def optimizer_step(self) -> torch.Tensor | None:
        """Step the optimizer (and a per-step scheduler); returns the global gradient norm before
        clipping when clipping is on (what ``clip_grad_norm_`` returns), for ``Monitor.step``: the
        clipped norm would be constant and hide an explosion."""
        grad_norm, scaler = None, self.scaler if self.scaler.is_enabled() else None  # off: no GradScaler calls
        if self.cfg.grad_clip:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None and not self.plateau and self.cfg.scheduler.interval == "step":
            self.scheduler.step()
        return grad_norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Validation loss (and accuracy) over the whole validation set, summed on the device."""
        self.net.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        count = torch.zeros((), device=self.device, dtype=torch.long)
        shard = range(self.rank, len(self.bundle.val), self.world_size)  # no padding: exact sums
        for x, y in self._loader(self.bundle.val, shard):
            self.monitor.keep_alive()  # a long validation is progress, not a stall
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            out = self._fit_shape(self.model(x), y).float()
            k = self._predictions(y)
            loss_sum += self.loss_fn(out, y).float() * k
            count += k
            if self.classification:
                correct += self._correct(out, y)
        totals = self._reduce(torch.stack([loss_sum, correct.float(), count.float()])).tolist()
        n = max(totals[2], 1)
        return {"val_loss": totals[0] / n, "val_acc": totals[1] / n if self.classification else None,
                "val_count": int(totals[2]) if self.classification else None}

    def end_epoch(self, epoch: int) -> None:
        mon, cfg = self.monitor, self.cfg
        val = self.evaluate()
        lr_before = self.optimizer.param_groups[0]["lr"]
        metrics = mon.end_epoch(val_loss=val["val_loss"], val_acc=val["val_acc"], lr=lr_before,
                                val_count=val["val_count"])
        if self.scheduler is not None and (self.plateau or cfg.scheduler.interval == "epoch"):
            if self.plateau:
                self.scheduler.step(metrics[cfg.scheduler.monitor])
            else:
                self.scheduler.step()
        lr_after = self.optimizer.param_groups[0]["lr"]
        if lr_after < lr_before * (1 - 1e-6) - LR_EPS:
            mon.log("INFO", f"Epoch {epoch}: LR reduced to {lr_after:g}")
        self._epoch_checkpoints(epoch, metrics)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, kind: str, monitor_state: dict) -> Path | Future[Path]:
        """The monitor's checkpoint hook, called at a step boundary: ``manual`` and ``stop`` on
        request, ``last``/``epoch``/``best`` through ``Monitor.save_checkpoint`` at an epoch's end.
        ``monitor_state`` is ``Monitor.state_dict()``; it says where the run is, and is stored for
        the resume. Rank 0 snapshots the state and returns a future of the file, written in the
        background; the others hold identical weights and only name the file."""
        s = monitor_state
        kind = "last" if kind == "stop" else kind
        epoch, step = s["epochs_done"], s["global_step"]
        path = self.ckpts.path_for(kind, epoch=epoch, step=step)
        if self.rank != 0:
            return path
        state = self._training_state(monitor_state)
        events = self.monitor.sink.events_mark()  # the TensorBoard records this state covers
        future = self.writer.save(state, path, key=_state_key(state), before_commit=partial(_events_end, events))
        future.add_done_callback(partial(self._written, kind))
        return future

    def _training_state(self, monitor_state: dict) -> dict:
        """Everything a resume needs, as it is at this step boundary (live tensors: the writer copies them)."""
        s = monitor_state
        epoch = s["epochs_done"]
        in_epoch = s["epoch"] > epoch  # stopped mid-epoch: the samples it saw are skipped on resume
        samples_done = min(s["batch"] * self._samples_per_step(), len(self.bundle.train)) if in_epoch else 0
        return {
            "format": ckpt.FORMAT_VERSION, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(), "epoch": epoch, "batch": s["batch"],
            "samples_done": samples_done, "world_size": self.world_size, "global_step": s["global_step"],
            "rng": ckpt.rng_state(), "config": self.cfg.model_dump(mode="json"),
            "monitor": monitor_state, "best": self.best, "seed": self.seed,
        }

    def _written(self, kind: str, future: Future) -> None:
        """On the writer thread, once a checkpoint is on disk (or failed): rotate epoch files;
        report a failure nobody waits for (an epoch's end); stop on a full disk."""
        error = future.exception()
        if error is None:
            if kind == "epoch":
                self.ckpts.rotate()
            return
        if kind not in ("manual", "stop"):  # the controller reports the ones it asked for
            self.monitor.log("ERROR", f"checkpoint {kind} failed: {type(error).__name__}: {error}")
        if is_disk_full(error):
            self.monitor.sink.writes.note_disk_full(f"{kind} checkpoint", error)

    def _samples_per_step(self) -> int:
        """Training samples one optimizer step consumes, over all ranks."""
        return self.batch_size * self.cfg.accumulate_steps * self.world_size

    def _epoch_checkpoints(self, epoch: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        cfg = self.cfg.checkpoint
        key = self.cfg.scheduler.monitor
        value = metrics.get(key)
        better = value is not None and (self.best is None or (value > self.best if key.endswith("acc") else value < self.best))
        if better:
            self.best = value
            self.monitor.save_checkpoint("best")
        if cfg.every_epochs and epoch % cfg.every_epochs == 0:
            self.monitor.save_checkpoint("epoch")
        self.monitor.save_checkpoint("last")

    def _tidy_for_resume(self, saved: dict) -> int:
        """Before a resume: remove the temp files a killed writer left, and the TensorBoard scalars
        written after the checkpoint (the resumed run writes those steps again); how many went."""
        ckpt.remove_stale_temps(self.run.checkpoint_dir, self.run.state_dir)
        return drop_orphaned_scalars(self.run.path, saved.get("events"))

    def _load_latest(self) -> dict:
        path = ckpt.CheckpointManager(self.run).latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.run.checkpoint_dir}")
        return ckpt.load(path, map_location="cpu")  # load_state_dict moves tensors to the model's device

    def _restore(self, state: dict) -> None:
        ckpt.check_resume(state, self.model, self.optimizer, self.cfg)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        self.best = state.get("best")
        self._skip = state.get("samples_done", 0)

    # ------------------------------------------------------------------ helpers

    def _loader(self, dataset, sampler) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda")

    def _shard_len(self) -> int:
        return -(-len(self.bundle.train) // self.world_size)

    def _param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.dist is None:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce_sum(t) if self.dist else t


def _state_key(state: dict) -> tuple:
    """What makes two checkpoints of one run the same state: a save with the key of the last
    write is linked to its file instead of serialised again (best, epoch-N and last of one epoch)."""
    m = state["monitor"]
    return (state["global_step"], state["epoch"], state["batch"], state["best"],
            tuple(sorted(m.get("interventions", {}).items())))


def _events_end(mark: Mark | None, state: dict) -> None:
    """On the writer thread: wait until the events queued before the snapshot are on disk, and
    store where they end, so a resume can drop what a killed run wrote after (tbhealth.monitor.orphans)."""
    if mark is not None and mark.wait(EVENTS_WAIT_S) and mark.offset is not None:
        state["events"] = {"file": mark.path.name, "offset": mark.offset}

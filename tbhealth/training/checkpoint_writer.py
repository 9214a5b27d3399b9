"""Checkpoints written off the training thread: a snapshot there, the file on a writer thread.

Why: ``torch.save`` of ``last`` + ``best`` + ``epoch-N`` at every epoch's end took 16 % of a
small run's training time, all of it on the training thread (issue 14). Here the training thread
only copies the state's tensors into host buffers (a memcpy per tensor on the CPU; on a GPU,
non-blocking copies into pinned buffers and one CUDA event per device, which the *writer* thread
waits for) and gets a :class:`~concurrent.futures.Future` of the file back. The writer thread
serialises, fsyncs, renames and fsyncs the folder (:func:`tbhealth.run.files.atomic_write`),
then resolves the future: a file whose future is done survives a ``kill -9`` or a power loss.

The rules, each for a reason:

* **One write in flight.** A new snapshot waits until the previous write has read its buffers,
  so the host holds at most *one* extra copy of the state, reused from one checkpoint to the next
  (pinned memory is slow to allocate). The training thread only waits when checkpoints are asked
  for faster than they are written.
* **One serialisation per state.** A save with the same ``key`` as the last write (``best``,
  ``epoch-N`` and ``last`` of one epoch) becomes a hard link to its file (a copy where the file
  system has no links), in order, after it.
* ``before_commit(state)`` runs on the writer thread before the state is serialised: the trainer
  waits there for the TensorBoard events the checkpoint covers to be on disk, and stores where
  they end (see :mod:`tbhealth.monitor.orphans`).
* A failure resolves the future with its exception; nothing is raised on the training thread.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tbhealth.run.files import atomic_write, link_atomic

__all__ = ["CheckpointWriter", "HostStaging"]

_ATOMS = (int, float, str, bytes, type(None))  # immutable: shared, not copied


class HostStaging:
    """Host buffers for a state's tensors, kept from one snapshot to the next (one copy of the state).

    A buffer is reused when the tensor at the same place in the state has the same shape and
    dtype; what the state no longer holds is let go. CUDA tensors go into pinned buffers with
    non-blocking copies, ordered on their device's current stream: whatever the training thread
    launches next cannot change them before the copy has read them.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def copy(self, state: Any) -> tuple[Any, list]:
        """``state`` with every tensor copied to host memory and everything else deep-copied, and
        the CUDA events to wait for before reading the copies (none on the CPU)."""
        used: dict[tuple, torch.Tensor] = {}
        devices: set[torch.device] = set()
        copied = self._walk(state, (), used, devices)
        self._buffers = used
        return copied, [_record_event(d) for d in devices]

    def release(self) -> None:
        self._buffers = {}

    def _walk(self, obj: Any, key: tuple, used: dict, devices: set) -> Any:
        if isinstance(obj, _ATOMS):
            return obj
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, key, used, devices)
        if type(obj) in (dict, OrderedDict):  # a module's state_dict: an OrderedDict with _metadata
            out = type(obj)((k, self._walk(v, (*key, k), used, devices)) for k, v in obj.items())
            if hasattr(obj, "_metadata"):
                out._metadata = copy.deepcopy(obj._metadata)
            return out
        if type(obj) in (list, tuple):
            if all(isinstance(v, _ATOMS) for v in obj):  # e.g. Python's RNG state: 625 ints
                return obj if type(obj) is tuple else list(obj)
            return type(obj)(self._walk(v, (*key, i), used, devices) for i, v in enumerate(obj))
        return copy.deepcopy(obj)  # plain values; the live objects keep changing after this call

    def _tensor(self, t: torch.Tensor, key: tuple, used: dict, devices: set) -> torch.Tensor:
        t = t.detach()
        if t.layout is not torch.strided or t.is_quantized or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return t.to("cpu", copy=True)  # sparse, quantized, subclasses: a plain synchronous copy
        cuda = t.device.type == "cuda"
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or (cuda and not buf.is_pinned()):
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        buf.copy_(t, non_blocking=cuda)  # other devices (mps, xpu): synchronous, always safe
        if cuda:
            devices.add(t.device)
        used[key] = buf
        return buf


def _record_event(device: torch.device):
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


@dataclass
class _Task:
    """A write (``state`` set) or a link to an earlier write's file (``source`` set)."""

    path: Path
    future: Future = field(default_factory=Future)
    state: Any = None
    events: list = field(default_factory=list)
    before_commit: Callable[[Any], None] | None = None
    source: _Task | None = None


class CheckpointWriter:
    """Writes checkpoints on a background thread, in order, one serialisation in flight."""

    def __init__(self, root: Path | None = None, name: str = "tbhealth-checkpoints"):
        self._root, self._name = root, name  # root: no symlink below it is followed (the run directory)
        self._staging = HostStaging()
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last: tuple[Any, _Task] | None = None  # the last write: its key and task
        self._tail: Future | None = None  # the last task queued
        self._closed = False

    def save(self, state: Any, path: Path, *, key: Any = None,
             before_commit: Callable[[Any], None] | None = None) -> Future:
        """Snapshot ``state`` now and write it to ``path`` in the background; a future of ``path``.

        Call on the training thread at a step boundary. ``key`` names the training state (e.g.
        its step): a save with the key of the last write links to that file instead.
        """
        if self._closed:
            raise RuntimeError("this CheckpointWriter is closed")
        last = self._last
        if key is not None and last is not None and last[0] == key and not _failed(last[1].future):
            return self._queue_task(_Task(Path(path), source=last[1]))
        if last is not None:
            wait([last[1].future])  # its buffers are the ones this snapshot overwrites
        staged, events = self._staging.copy(state)
        task = _Task(Path(path), state=staged, events=events, before_commit=before_commit)
        self._last = (key, task)
        return self._queue_task(task)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is written (or failed); False on timeout."""
        tail = self._tail
        return tail is None or not wait([tail], timeout).not_done

    @contextlib.contextmanager
    def draining(self) -> Iterator[CheckpointWriter]:
        """Around a training: on the way out, wait for the writes (a run ends once its checkpoints
        are on disk) and let the host buffers go; an abort (a second Ctrl-C) does not wait."""
        try:
            yield self
        except KeyboardInterrupt:
            self._close(drain=False)
            raise
        except BaseException:
            self._close(drain=True)
            raise
        self._close(drain=True)

    def _close(self, drain: bool) -> None:
        self._closed = True
        if drain:
            self.wait()
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
        self._staging.release()
        self._last = None

    # ------------------------------------------------------------------ the writer thread

    def _queue_task(self, task: _Task) -> Future:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._tail = task.future
        self._queue.put(task)
        return task.future

    def _run(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                path = self._link(task, self._root) if task.source is not None else self._write(task, self._root)
            except BaseException as e:  # noqa: BLE001 - the future carries it to whoever waits
                task.state = None
                task.future.set_exception(e)
            else:
                task.state = None
                task.future.set_result(path)

    @staticmethod
    def _write(task: _Task, root: Path | None) -> Path:
        for event in task.events:  # the device-to-host copies have landed
            event.synchronize()
        if task.before_commit is not None:
            task.before_commit(task.state)
        atomic_write(task.path, lambda f: torch.save(task.state, f), durable=True, root=root)
        return task.path

    @staticmethod
    def _link(task: _Task, root: Path | None) -> Path:
        source = task.source.future.result()  # done already: tasks run in order; raises if it failed
        if source != task.path:
            link_atomic(source, task.path, root)
        return task.path


def _failed(future: Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)

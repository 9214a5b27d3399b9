"""A TensorBoard event-file writer whose cost on the training thread is one queue append.

Why not ``torch.utils.tensorboard.SummaryWriter``: without TensorFlow installed it builds the
protobuf, computes the record CRC in pure Python and reopens the file for every record, all on
the caller's thread (about 70 µs per scalar), and it flushes only every 120 s by default. A
monitor that logs a few dozen series per step would tax training for the privilege.

Here the calling thread only copies the values and appends one tuple to a ``deque`` (atomic
under the GIL, so several producer threads are safe without a lock). A daemon thread wakes every
``flush_secs`` (or when the queue fills up, or on ``flush()``), encodes the whole backlog, frames
it as TFRecords and hands it to the kept-open file in one write. All scalars of one ``scalars()``
call become one ``Event``, which is both cheaper and what TensorBoard reads fastest. The record
CRC-32C comes from ``google-crc32c`` (Google's C library, hardware-accelerated where the CPU has
a CRC instruction): well under a µs per record. When the queue
is full, records are dropped and counted, never waited for; errors on the writer thread are
logged once and never reach the training loop.
"""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import google_crc32c
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars_metadata
from tensorboard.plugins.text import metadata as text_metadata

__all__ = ["EventWriter", "Mark", "masked_crc32c"]

_log = logging.getLogger(__name__)
_file_counter = itertools.count()  # makes file names unique within a process, as TF does
_BATCH_BYTES = 1 << 20  # write to the file in pieces of about this size

# --- TFRecord framing: masked CRC-32C (Castagnoli), the checksum TFRecord files require ------
def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.lru_cache(maxsize=4096)
def _record_header(length: int) -> bytes:
    header = struct.pack("<Q", length)
    return header + struct.pack("<I", masked_crc32c(header))


def _frame(payload: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
    return _record_header(len(payload)) + payload + struct.pack("<I", masked_crc32c(payload))


# --- Events: pure functions from queued items to serialized ``Event`` protos --------------
def _scalars_event(step: int, wall_time: float, values: dict) -> bytes:
    event = event_pb2.Event(wall_time=wall_time, step=step)
    add = event.summary.value.add
    for tag, value in values.items():
        add(tag=tag, simple_value=float(value))  # float32 on disk, like TF; NaN/Inf kept
    return event.SerializeToString()


def _string_tensor_event(
    step: int, wall_time: float, tag: str, metadata: summary_pb2.SummaryMetadata, data: bytes
) -> bytes:
    # Without a data class TensorBoard's data server drops the value; rank 0 renders as markdown.
    metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    tensor = tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[data])
    event = event_pb2.Event(wall_time=wall_time, step=step)
    event.summary.value.add(tag=tag, metadata=metadata, tensor=tensor)
    return event.SerializeToString()


def _text_event(step: int, wall_time: float, tag: str, markdown: str) -> bytes:
    metadata = text_metadata.create_summary_metadata(display_name=tag, description="")
    return _string_tensor_event(step, wall_time, tag, metadata, markdown.encode("utf-8"))


def _layout_event(step: int, wall_time: float, layout: dict) -> bytes:
    proto = layout_pb2.Layout()
    for category_title, charts in layout.items():
        category = proto.category.add(title=category_title)
        for chart_title, tag_regexes in charts.items():
            chart = category.chart.add(title=chart_title)
            chart.multiline.tag.extend(tag_regexes)
    metadata = custom_scalars_metadata.create_summary_metadata()
    tag = custom_scalars_metadata.CONFIG_SUMMARY_TAG
    return _string_tensor_event(step, wall_time, tag, metadata, proto.SerializeToString())


class Mark(threading.Event):
    """A position in an :class:`EventWriter`'s queue (see :meth:`EventWriter.mark`): ``offset``
    is the length of ``path`` up to the records queued before it, or None if unknown."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.offset = path, None


class EventWriter:
    """Writes scalars, text and a custom-scalars layout to one TensorBoard event file."""

    def __init__(
        self,
        logdir: str | Path,
        *,
        flush_secs: float = 1.0,
        filename_suffix: str = "",
        max_queue: int = 100_000,
    ) -> None:
        if flush_secs <= 0 or max_queue <= 0:
            raise ValueError(f"flush_secs ({flush_secs}) and max_queue ({max_queue}) must be > 0")
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            f".{os.getpid()}.{next(_file_counter)}{filename_suffix}"
        )
        self.path = logdir / name
        self._file = open(self.path, "wb")  # noqa: SIM115 - kept open for the writer's lifetime
        version = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        self._file.write(_frame(version.SerializeToString()))
        self._file.flush()

        self._flush_secs = flush_secs
        self._max_queue = max_queue
        self._wake_at = max(1, max_queue // 2)  # wake the writer early rather than drop
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards close() and the drop counter, never the file
        self._dropped = 0
        self._error_reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tbhealth-events", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # the last flush_secs of data survive a missing close()

    # --- producer side: runs on the training thread, must stay cheap ---------------------
    def scalars(
        self, step: int, values: Mapping[str, float], wall_time: float | None = None
    ) -> None:
        """Queue one event holding every scalar in ``values`` (python floats, NaN allowed)."""
        wall_time = time.time() if wall_time is None else wall_time
        self._put((_scalars_event, step, wall_time, dict(values)))

    def text(self, step: int, tag: str, markdown: str, wall_time: float | None = None) -> None:
        """Queue a markdown text for TensorBoard's Text dashboard."""
        wall_time = time.time() if wall_time is None else wall_time
        self._put((_text_event, step, wall_time, tag, markdown))

    def custom_scalars(self, layout: Mapping[str, Mapping[str, Sequence[str]]]) -> None:
        """Queue a Custom Scalars layout: category -> chart title -> tag regexes on one chart."""
        copied = {cat: {chart: list(tags) for chart, tags in charts.items()}
                  for cat, charts in layout.items()}
        self._put((_layout_event, 0, time.time(), copied))

    def _put(self, item: tuple) -> None:
        pending = len(self._queue)
        if pending >= self._max_queue or self._closed:
            with self._lock:
                self._dropped += 1
            return
        self._queue.append(item)
        if pending >= self._wake_at:
            self._wake.set()

    @property
    def dropped(self) -> int:
        """Records dropped because the queue was full or the writer was closed."""
        return self._dropped

    # --- control -------------------------------------------------------------------------

    def mark(self) -> Mark:
        """A place in the queue, without waiting: the :class:`Mark` is set once every record
        queued before it is in the file and fsynced, and then says where in the file they end.
        A checkpoint takes one on the training thread and waits for it on its writer thread, so
        the events it covers are on disk before it counts (and a resume knows where they end)."""
        mark = Mark(self.path)
        if self._closed:
            mark.set()  # nothing more will be written; no position to give
        else:
            self._queue.append(mark)
            self._wake.set()
        return mark

    def flush(self, timeout: float = 5.0) -> None:
        """Block until everything queued before this call is written (or ``timeout`` passes)."""
        if self._closed:
            return
        done = threading.Event()
        self._queue.append(done)
        self._wake.set()
        if not done.wait(timeout):
            _log.warning("tbhealth: event writer flush timed out after %.1f s (%s)",
                         timeout, self.path)

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Write everything queued and close the file; later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._wake.set()
        self._thread.join()
        self._drain()  # whatever producers appended while the thread was finishing
        self._file.close()

    # --- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._flush_secs)
            self._wake.clear()
            try:
                self._drain()
            except Exception as exc:  # keep the thread alive whatever happens
                self._report(f"unexpected error {exc!r}")

    def _drain(self) -> None:
        chunk: list[bytes] = []
        size = 0
        done: list[threading.Event] = []
        for _ in range(len(self._queue)):  # a snapshot: producers may keep appending
            item = self._queue.popleft()
            if isinstance(item, threading.Event):
                if isinstance(item, Mark):  # records after it must not count as before it
                    self._write(chunk)
                    chunk, size = [], 0
                    item.offset = self._sync()
                done.append(item)
                continue
            try:
                record = _frame(item[0](*item[1:]))
            except Exception as exc:  # a bad value must not stop the other records
                self._report(f"could not encode a record ({exc!r}); it was skipped")
                continue
            chunk.append(record)
            size += len(record)
            if size >= _BATCH_BYTES:
                self._write(chunk)
                chunk, size = [], 0
        self._write(chunk)
        for event in done:
            event.set()

    def _write(self, records: list[bytes]) -> None:
        if not records:
            return
        try:  # only this thread writes (close() joins it first), so no lock to wait on
            self._file.write(b"".join(records))
            self._file.flush()
        except (OSError, ValueError) as exc:
            self._report(f"could not write {len(records)} records to {self.path} ({exc!r})")

    def _sync(self) -> int | None:
        """Everything written so far reaches the disk; returns the file's length, None on failure."""
        try:
            os.fsync(self._file.fileno())
            return self._file.tell()
        except (OSError, ValueError) as exc:
            self._report(f"could not sync {self.path} ({exc!r})")
            return None

    def _report(self, message: str) -> None:
        if not self._error_reported:
            self._error_reported = True
            _log.error("tbhealth event writer: %s; further errors are not reported", message)

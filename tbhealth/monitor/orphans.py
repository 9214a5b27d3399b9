"""Scalars a killed run wrote after its last checkpoint, dropped before it resumes.

A run killed at step K resumes from its checkpoint at step S < K and trains S+1..K again. The
killed process had already written scalars for those steps (and for the epoch it was in);
left in place, each would show twice. TensorBoard's own remedy does not fit: its Python loader
(``EventAccumulator``, ``--load_fast=false``) purges only on a ``SessionLog.START`` event, and
then every series at or past one step number, while tbhealth's epoch series count epochs and its
step series count steps; the Rust data server drops a series' later points when an older step
arrives, but only in memory. So the files themselves are put right, once, at the resume:

* a checkpoint stores where the events it covers end (``{"file": name, "offset": bytes}``, taken
  with :meth:`tbhealth.monitor.events.EventWriter.mark` when the snapshot was taken);
* at the resume, scalar events past that offset in that file, and in event files created after
  it (incarnations killed before their first checkpoint), are removed. Text events (log lines,
  alerts, control) are kept: they happened, and no later point replaces them. A record cut short
  by the kill goes too.

Nothing else is touched: files created before the checkpoint's file, and other run directories.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from tensorboard.compat.proto import event_pb2

from tbhealth.monitor.events import masked_crc32c

__all__ = ["drop_orphaned_scalars"]

_HEADER = 12  # u64 length + u32 masked CRC of the length
_FOOTER = 4  # u32 masked CRC of the payload
_PREFIX = "events.out.tfevents."


def drop_orphaned_scalars(run_dir: Path, position: dict | None) -> int:
    """Remove the scalar events written after ``position`` (see the module doc); how many went."""
    if not isinstance(position, dict) or not isinstance(position.get("file"), str):
        return 0  # a checkpoint from before positions were stored: leave the files alone
    first = Path(run_dir) / position["file"]
    later = [p for p in sorted(Path(run_dir).glob(_PREFIX + "*")) if _created(p) >= _created(first) and p != first]
    dropped = 0
    for path, offset in ((first, int(position.get("offset") or 0)), *((p, 0) for p in later)):
        dropped += _trim(path, offset)
    return dropped


def _created(path: Path) -> int:
    """The creation time in an event file's name (``events.out.tfevents.<seconds>.<host>...``)."""
    try:
        return int(path.name[len(_PREFIX):].split(".", 1)[0])
    except ValueError:
        return -1


def _trim(path: Path, offset: int) -> int:
    try:
        f = open(path, "r+b")  # noqa: SIM115 - closed below
    except OSError:
        return 0
    with f:
        f.seek(offset)
        tail = f.read()
        kept, dropped, whole = _without_scalars(tail)
        if not dropped and whole:
            return 0
        f.seek(offset)
        f.truncate()
        f.write(kept)
        f.flush()
        os.fsync(f.fileno())
    return dropped


def _without_scalars(data: bytes) -> tuple[bytes, int, bool]:
    """The records of ``data`` that are not scalar events, how many scalar events there were,
    and whether ``data`` ended on a whole record."""
    kept, dropped, pos = [], 0, 0
    while len(data) - pos >= _HEADER:
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + _HEADER + length + _FOOTER
        if end > len(data) or struct.unpack_from("<I", data, end - _FOOTER)[0] != masked_crc32c(
                data[pos + _HEADER:end - _FOOTER]):
            return b"".join(kept), dropped, False
        if _is_scalar(data[pos + _HEADER:end - _FOOTER]):
            dropped += 1
        else:
            kept.append(data[pos:end])
        pos = end
    return b"".join(kept), dropped, pos == len(data)


def _is_scalar(payload: bytes) -> bool:
    try:
        event = event_pb2.Event.FromString(payload)
    except Exception:  # noqa: BLE001 - not an event we can read: keep it as it is
        return False
    return any(v.HasField("simple_value") or v.metadata.plugin_data.plugin_name == "scalars"
               for v in event.summary.value)

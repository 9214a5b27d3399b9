"""What a reader accepts from run-state files that anyone with write access to the logdir may have written.

The README invites other tools to append to ``control.jsonl``, and any process that can write to
a logdir can damage or plant a status, an alert or an acknowledgement. Readers (the CLI, the
Health tab, the trainer reading its control queue) check each document's fields here before they
use them, so one bad file makes one run "unreadable, because …" or one line "rejected, because …",
never a traceback for every run. Absent fields are fine (a starting run has few); present ones
must have the documented type. Pure functions: no I/O, no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tbhealth.run.states import COMMANDS, STATES

#: A request id as the CLI and the Health tab make them (``GET ack`` accepts the same).
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Latest plausible Unix time (the year 5138): later ones cannot be shown as dates.
MAX_TIME = 1e11
_MAX_COUNT = 2**53  # integers JavaScript still holds exactly


@dataclass(frozen=True)
class ControlRequest:
    """A request as read back by the trainer. ``error`` is set for a line it must reject."""

    id: str
    command: str
    source: str = ""
    time: float = 0.0
    error: str | None = None


def _show(value: Any) -> str:
    text = repr(value if not isinstance(value, str) else value[:60])
    return text if len(text) <= 40 else text[:37] + "..."


def _finite(v: Any) -> bool:
    """A number that converts to a finite float (``10**400`` does not; a bool is not a number)."""
    if isinstance(v, bool):
        return False
    return (isinstance(v, int) and abs(v) < 2**63) or (isinstance(v, float) and math.isfinite(v))


def _count(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_COUNT else "a whole number >= 0"


def _time(v: Any) -> str | None:
    return None if _finite(v) and 0 <= v <= MAX_TIME else "a Unix time in seconds"


def _real(v: Any) -> str | None:
    return None if _finite(v) else "a finite number"


def _value(v: Any) -> str | None:
    """A measured value: any number (a NaN loss is news), or NaN spelled as JSON output spells it."""
    return None if _finite(v) or isinstance(v, float) or v in ("NaN", "Infinity", "-Infinity") else "a number"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _mapping_of(check: Callable[[Any], str | None], what: str) -> Callable[[Any], str | None]:
    def mapping(v: Any) -> str | None:
        ok = isinstance(v, dict) and all(x is None or check(x) is None for x in v.values())
        return None if ok else f"an object of {what}"
    return mapping


def _list_of_objects(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(x, dict) for x in v) else "a list of objects"


def _metric(v: Any) -> str | None:
    ok = isinstance(v, dict) and _value(v.get("value")) is None and (v.get("delta") is None or _value(v["delta"]) is None)
    return None if ok else 'an object {"value": number, "delta": number or null}'


def _system(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "an object"
    gpu = v.get("gpu")
    numbers = all(x is None or _real(x) is None for k, x in v.items() if k != "gpu")
    gpu_ok = gpu is None or (isinstance(gpu, dict) and all(
        x is None or (_text(x) if k == "name" else _real(x)) is None for k, x in gpu.items()))
    return None if numbers and gpu_ok else "an object of numbers (and gpu: an object or null)"


def _state(v: Any) -> str | None:
    return None if v in STATES else f"one of {', '.join(STATES)}"


_STATUS_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "state": _state,
    **dict.fromkeys(("epoch", "total_epochs", "total_steps", "epochs_done", "batch", "batches_per_epoch",
                     "global_step", "alerts_active", "world_size", "pid"), _count),
    **dict.fromkeys(("started_at", "updated_at", "last_step_at"), _time),
    **dict.fromkeys(("elapsed_s", "eta_s", "health_score"), _real),
    **dict.fromkeys(("run", "message", "device", "host", "last_checkpoint", "run_dir", "resume_hint"), _text),
    "metrics": _mapping_of(_metric, 'metrics {"value": ..., "delta": ...}'),
    "system": _system,
    "interventions": _mapping_of(_count, "counts"),
    "log_counts": _mapping_of(_count, "counts"),
    "ranks": _list_of_objects,
}

_ALERT_FIELDS: dict[str, Callable[[Any], str | None]] = {
    **dict.fromkeys(("rule", "severity", "message", "layer", "action"), _text),
    **dict.fromkeys(("epoch", "step", "rank"), _count),
    "time": _time,
    **dict.fromkeys(("value", "threshold"), _value),
    "resolved": _flag,
}


def _first_problem(doc: dict, fields: dict[str, Callable[[Any], str | None]]) -> str | None:
    for key, check in fields.items():
        value = doc.get(key)
        if value is None:
            continue
        expected = check(value)
        if expected:
            return f"{key} is {_show(value)}, expected {expected}"
    return None


def status_problem(doc: Any) -> str | None:
    """Why ``doc`` cannot be used as a status, or None. ``state`` is required, the rest optional."""
    if not isinstance(doc, dict):
        return f"holds {_show(doc)}, not a JSON object"
    if doc.get("state") is None:
        return "has no state"
    return _first_problem(doc, _STATUS_FIELDS)


def alert_problem(record: dict) -> str | None:
    """Why an alert record is skipped by readers, or None. ``id`` is required."""
    rid = record.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= 200:
        return f"id is {_show(rid)}, expected a string"
    return _first_problem(record, _ALERT_FIELDS)


def bad_line_id(offset: int, record: dict) -> str:
    """An id for a request line without a usable one: the same line at the same place gets the
    same id (so a resumed run does not reject it twice), any other line another one."""
    text = json.dumps(record, sort_keys=True, default=str)
    return "line-" + hashlib.sha1(f"{offset}:{text}".encode()).hexdigest()[:12]


def parse_request(record: dict, offset: int) -> ControlRequest:
    """A control line as a request, or as a rejection (``error`` set) that says what is wrong."""
    if "_malformed" in record:
        return ControlRequest(bad_line_id(offset, record), "", error=f"not a JSON object: {record['_malformed'][:80]!r}")
    rid, command = record.get("id"), record.get("command")
    shown = command if isinstance(command, str) else ""
    if not isinstance(rid, str) or not REQUEST_ID.match(rid):
        why = "request has no id" if not rid else f"id {_show(rid)} is not 1-64 letters, digits, _ or -"
        return ControlRequest(bad_line_id(offset, record), shown[:20], error=why)
    if command not in COMMANDS:
        return ControlRequest(rid, shown[:20], error=f"unknown command {_show(command)}; allowed: {', '.join(COMMANDS)}")
    sent = record.get("time", 0.0)
    if sent is not None and _time(sent):
        return ControlRequest(rid, command, error=f"time is {_show(sent)}: expected a Unix time in seconds")
    source = record.get("source")
    return ControlRequest(rid, command, source=source[:64] if isinstance(source, str) else "", time=float(sent or 0.0))


__all__ = ["REQUEST_ID", "MAX_TIME", "ControlRequest", "status_problem", "alert_problem", "bad_line_id", "parse_request"]

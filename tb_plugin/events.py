"""What happened to a run and when, for the Health tab to mark on its charts (``GET events``).

Three kinds of event, each from the record that already holds it (nothing new is written):

* ``alert``: an alert episode fired or resolved (``alerts.jsonl``; the first record of an id is
  the firing, the first one with ``resolved: true`` its resolution);
* ``control``: a pause, resume, stop or checkpoint request and what became of it
  (``control.jsonl`` + ``acks.jsonl``; the trainer stamps the step it acted at);
* ``lr``: the learning rate changed between two epochs (the ``lr`` series, one point per epoch).

Each event has ``kind``, ``step``, ``epoch`` and ``time``; what a record lacks is placed with
:class:`RunClock`, which converts between wall time, global step and epoch using the run's own
series. ``epoch_x`` is where the event sits on an epoch axis (epoch *k* spans ``(k-1, k]``,
its point is drawn at *k*), so a pause half-way through epoch 3 is drawn at 2.5.
Pure functions over records and series; :func:`events_impl` does the reading.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tbhealth.run.files import read_records
from tbhealth.run.status import json_safe

from tbhealth_plugin.api import open_run

EVENT_KINDS = ("alert", "control", "lr")
#: Series the events are placed with: per-epoch ``lr`` and ``train/loss`` (their wall times are
#: the ends of epochs) and per-step ``step/loss`` (its wall times map time to global step).
CLOCK_TAGS = ("lr", "train/loss", "step/loss")
#: Most events in one answer; the newest are kept (``omitted`` counts the others).
MAX_EVENTS = 5000
#: A change smaller than this fraction of the rate is float noise, not an LR change.
_LR_NOISE = 1e-6
#: Copied from the alert record into its events when present.
_ALERT_FIELDS = ("id", "message", "layer", "layers", "rank", "value", "threshold", "action")
#: The monitor logs a resolution as this prefix plus the alert's message.
_RESOLVED_PREFIX = "resolved: "


# --------------------------------------------------------------------------- placing events


class RunClock:
    """Converts between wall time, global step and epoch for one run, from its own series.

    ``step_points``: ``(step, wall_time)`` of a per-step series; ``epoch_ends``: ``(epoch,
    wall_time)`` of a per-epoch series (written when the epoch ended); ``started_at`` stands in
    for the end of epoch 0. Any of them may be empty: a method then answers None rather than guess.
    """

    def __init__(self, step_points: Iterable[tuple[int, float]] = (), epoch_ends: Iterable[tuple[int, float]] = (),
                 batches_per_epoch: int | None = None, started_at: float | None = None):
        steps = sorted((float(w), int(s)) for s, w in step_points if _finite(w))
        self._step_times = [w for w, _ in steps]
        self._steps = [s for _, s in steps]
        ends = sorted((float(w), int(e)) for e, w in epoch_ends if _finite(w))
        if _finite(started_at) and (not ends or started_at < ends[0][0]):
            ends.insert(0, (float(started_at), ends[0][1] - 1 if ends else 0))
        self._end_times = [w for w, _ in ends]
        self._end_epochs = [e for _, e in ends]
        self.batches_per_epoch = batches_per_epoch if isinstance(batches_per_epoch, int) and batches_per_epoch > 0 else None

    def step_at(self, t: float | None) -> int | None:
        """The global step at wall time ``t``, interpolated between logged steps."""
        return _interpolate(self._step_times, self._steps, t, integral=True)

    def epoch_at(self, step: int | None, t: float | None) -> int | None:
        """The epoch in progress (1-based) at ``step`` (with a known epoch size) or at time ``t``."""
        if step is not None and self.batches_per_epoch:
            return max(1, math.ceil(step / self.batches_per_epoch))
        x = self.epoch_x(None, t)
        return None if x is None else max(1, math.ceil(x))

    def epoch_x(self, step: int | None, t: float | None) -> float | None:
        """Position on an epoch axis: ``step / batches_per_epoch``, else interpolated in time
        between the ends of epochs (after the last end: within the epoch in progress)."""
        if step is not None and self.batches_per_epoch:
            return step / self.batches_per_epoch
        if not _finite(t) or not self._end_times:
            return None
        if t > self._end_times[-1] and len(self._end_times) > 1:
            mean = (self._end_times[-1] - self._end_times[0]) / (self._end_epochs[-1] - self._end_epochs[0] or 1)
            return self._end_epochs[-1] + min(1.0, (t - self._end_times[-1]) / mean) if mean > 0 else None
        return _interpolate(self._end_times, self._end_epochs, t, integral=False)

    def place(self, event: dict) -> dict:
        """Fill the event's missing ``step``/``epoch`` and add ``epoch_x``; returns the event."""
        if event.get("step") is None:
            event["step"] = self.step_at(event.get("time"))
        if event.get("epoch") is None:
            event["epoch"] = self.epoch_at(event.get("step"), event.get("time"))
        x = self.epoch_x(event.get("step"), event.get("time"))
        if x is None and isinstance(event.get("epoch"), int):
            x = float(event["epoch"])
        event["epoch_x"] = x
        return event


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interpolate(xs: list[float], ys: list[int], x: float | None, integral: bool) -> float | int | None:
    """``ys`` at ``x``, linear between neighbours, clamped to the ends; None without points."""
    if not xs or not _finite(x):
        return None
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return ys[0]
    if i == len(xs):
        return ys[-1]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 + (y1 - y0) * ((x - x0) / (x1 - x0) if x1 > x0 else 1.0)
    return round(y) if integral else y


# --------------------------------------------------------------------------- events from records


def _number(x: Any) -> float | int | None:
    return x if _finite(x) else None


def alert_events(records: Iterable[dict], resolved_times: dict[str, list[float]] | None = None) -> list[dict]:
    """A ``fired`` event for the first record of each alert id, a ``resolved`` one for its first
    record with ``resolved: true``.

    A resolution record repeats the episode's start (``epoch``, ``step``, ``time`` are when it
    began); when it happened comes from ``resolved_time``/``resolved_step``/``resolved_epoch``
    when the record has them, else from ``resolved_times`` (message -> times of the monitor's
    "resolved: ..." log records, used in order), else it stays unknown (None).
    """
    merged: dict[str, dict] = {}
    pending = {m: list(ts) for m, ts in (resolved_times or {}).items()}
    out: list[dict] = []
    for r in records:
        if "_malformed" in r or not isinstance(r.get("id"), str):
            continue
        previous = merged.get(r["id"])
        alert = merged[r["id"]] = {**(previous or {}), **r}
        if previous is None:
            out.append(_alert_event(alert, fired=True, when=(alert.get("time"), alert.get("step"), alert.get("epoch"))))
        if alert.get("resolved") is True and not (previous or {}).get("resolved"):
            t = r.get("resolved_time")
            times = pending.get(alert.get("message"), [])
            if t is None and times:
                t = times.pop(0)
            out.append(_alert_event(alert, fired=False, when=(t, r.get("resolved_step"), r.get("resolved_epoch"))))
    return out


def _alert_event(alert: dict, *, fired: bool, when: tuple) -> dict:
    t, step, epoch = when
    event = {"kind": "alert", "time": _number(t), "step": _number(step), "epoch": _number(epoch),
             "rule": alert.get("rule"), "severity": alert.get("severity"), "fired": fired, "resolved": not fired}
    event.update({k: alert[k] for k in _ALERT_FIELDS if k in alert})
    return event


def control_events(requests: Iterable[dict], acks: dict[str, dict]) -> list[dict]:
    """One event per control request: ``status`` ``done``/``rejected`` from its acknowledgement
    (``time`` and ``step`` when the trainer acted), or ``pending`` (``time`` of the request)."""
    out = []
    for r in requests:
        rid, command = r.get("id"), r.get("command")
        if "_malformed" in r or not isinstance(rid, str) or not isinstance(command, str):
            continue
        ack = acks.get(rid)
        event = {"kind": "control", "time": _number((ack or r).get("time")), "step": _number((ack or {}).get("step")),
                 "epoch": None, "command": command, "source": str(r.get("source") or ""),
                 "status": str(ack.get("status", "done")) if ack else "pending", "id": rid,
                 "requested_time": _number(r.get("time"))}
        if ack:
            event["detail"] = str(ack.get("detail") or "")
            if isinstance(ack.get("checkpoint"), str):
                event["checkpoint"] = Path(ack["checkpoint"]).name
        out.append(event)
    return out


def lr_events(epochs: Sequence[int], values: Sequence[float | None], wall_times: Sequence[float]) -> list[dict]:
    """One event per change of the per-epoch learning rate, up or down.

    The ``lr`` point of epoch *k* is the rate epoch *k* trained with, written when it ended; a
    change from epoch *k-1* to *k* happened when epoch *k-1* ended: ``time`` is then, ``epoch``
    is *k* (the first epoch with the rate ``to``). Missing and non-finite points are skipped.
    """
    out = []
    prev: tuple[float, float] | None = None  # (value, wall time of its point)
    for epoch, value, wall in zip(epochs, values, wall_times):
        if not _finite(value):
            continue
        if prev is not None and abs(value - prev[0]) > _LR_NOISE * abs(prev[0]):
            out.append({"kind": "lr", "time": prev[1], "step": None, "epoch": int(epoch), "from": prev[0], "to": value})
        prev = (value, wall)
    return out


# --------------------------------------------------------------------------- reading a run


class _ResolutionLog:
    """Times of the "resolved: ..." records of each run's log, read incrementally and cached.

    Only needed while alert records carry no ``resolved_time``; the first request reads the log
    once, later ones only what was appended since.
    """

    MAX_RUNS = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Path, tuple[int, dict[str, list[float]]]] = {}

    def times(self, log_path: Path) -> dict[str, list[float]]:
        with self._lock:
            offset, found = self._runs.get(log_path, (0, {}))
            try:
                size = log_path.stat().st_size
            except OSError:
                size = 0
            if size < offset:  # replaced: start over
                offset, found = 0, {}
            records, offset = read_records(log_path, offset)
            for r in records:
                message = r.get("message")
                if isinstance(message, str) and message.startswith(_RESOLVED_PREFIX) and _finite(r.get("time")):
                    found.setdefault(message[len(_RESOLVED_PREFIX):], []).append(float(r["time"]))
            if len(self._runs) >= self.MAX_RUNS and log_path not in self._runs:
                self._runs.clear()
            self._runs[log_path] = (offset, found)
            return {m: list(ts) for m, ts in found.items()}


_resolutions = _ResolutionLog()


def _points(series: dict | None) -> list[tuple[int, float]]:
    if not series:
        return []
    return list(zip(series["steps"], series["wall_times"]))


def events_impl(logdir: str | None, run: Any, read_series: Callable[[str, Sequence[str]], dict]) -> dict:
    """``{run, events, omitted}``: the run's events oldest first (unplaceable ones last).

    ``read_series(run, tags)`` returns ``{tag: {steps, values, wall_times}}`` (``scalars.read_series``
    bound to the request); it is called with the validated run name.
    """
    rd, name = open_run(logdir, run)
    status = rd.read_status() or {}
    series = read_series(name, CLOCK_TAGS)
    clock = RunClock(_points(series.get("step/loss")), _points(series.get("train/loss")),
                     status.get("batches_per_epoch"), status.get("started_at"))
    alerts, _ = read_records(rd.alerts_path)
    requests, _ = read_records(rd.control_path)
    events = alert_events(alerts, _resolutions.times(rd.log_path)) + control_events(requests, rd.read_acks())
    lr = series.get("lr")
    for e in lr_events(lr["steps"], lr["values"], lr["wall_times"]) if lr else []:
        if clock.batches_per_epoch:  # the boundary before epoch `epoch`, exactly
            e["step"] = (e["epoch"] - 1) * clock.batches_per_epoch
        events.append(e)
    for e in events:
        clock.place(e)
    events.sort(key=lambda e: (e["time"] is None, e["time"] or 0.0))
    omitted = max(0, len(events) - MAX_EVENTS)
    return {"run": name, "events": json_safe(events[omitted:]), "omitted": omitted}


__all__ = ["EVENT_KINDS", "CLOCK_TAGS", "RunClock", "alert_events", "control_events", "lr_events", "events_impl"]

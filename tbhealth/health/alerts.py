"""Alert lifecycle and health score: pure bookkeeping over the findings of successive rounds.

A finding is a rule firing *now*; an alert is an *episode*: it fires once (a new id), is updated
while its condition persists (same id), and is resolved when a round that checked its rule no
longer finds it. A rule not checked this round (its inputs were not measured: e.g. dead_neurons
on a step without sampling) leaves its alerts open: silence is not health.

The tracker alone decides whether an episode is new: each :class:`AlertEvent` it returns says
whether it begins one (``starts_episode``), the event a configured action (pause, stop) acts on.
An episode carried over by ``--resume`` is not new, so a resumed run is not paused again by it.

Findings come in three states (see :mod:`tbhealth.health.findings`): a *firing* finding begins an
episode or updates the open one; a *holding* finding (the value is back between the firing and
the resolve threshold) only keeps an open episode open; an episode resolves when its rule's
round says *clear* for it, and its message becomes that clear finding's, which says what
cleared with the current value. One episode per rule (per rank under DDP): a per-layer rule's
record lists every affected layer in ``layers``, worst first, each ``{layer, value}``.

Each event's ``record`` is the whole alert, shaped like ``tbhealth alerts --json``:
``{id, rule, severity, message, epoch, step, time, layer, value, threshold, resolved, action}``
plus ``rank`` under DDP, ``layers`` for per-layer rules and ``stack`` (the training thread's
Python stack) for ``stalled``, and ``resolved_time``/``resolved_step``/``resolved_epoch`` once it
resolved. ``epoch``/``step``/``time`` are when the episode began; a reader that
merges events by id (``RunDir.read_alerts``) gets the latest message, value and state.
``value``/``threshold`` are JSON numbers or ``null`` (NaN/Inf would not survive strict JSON).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tbhealth.health.rules import Finding, episode_key

#: An update is recorded at once when the value moved by more than this fraction...
REL_CHANGE = 0.10
#: ...otherwise a changed message/value is recorded at most this often (seconds).
REFRESH_S = 60.0

# health_score weights: an open critical alert alone leaves 60 (it needs attention now); three
# open warnings leave 55; log noise alone can never take more than 45 points.
CRITICAL_PENALTY = 40
WARNING_PENALTY = 15
LOGGED_WARNING_PENALTY, LOGGED_WARNING_CAP = 2, 20
LOGGED_ERROR_PENALTY, LOGGED_ERROR_CAP = 5, 25


def _json_number(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _moved(old: float | None, new: float | None, rel: float) -> bool:
    if old is None or new is None:
        return (old is None) != (new is None)
    return abs(new - old) > rel * max(abs(old), 1e-30)


def _new_id(rule: str) -> str:
    # Random, not a counter: a resumed run appends to the same alerts file and must not reuse ids.
    return f"{rule}-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class AlertEvent:
    """One alert record to append to the run's alerts, and whether it begins an episode."""

    record: dict
    starts_episode: bool = False


class AlertTracker:
    """Turns each round's findings into alert events to record (fired, updated, resolved)."""

    def __init__(
        self,
        *,
        open_alerts: Iterable[dict] = (),
        rel_change: float = REL_CHANGE,
        refresh_s: float = REFRESH_S,
        new_id: Callable[[str], str] = _new_id,
    ) -> None:
        """``open_alerts``: unresolved alerts of an earlier session of this run (``--resume``), so
        they keep their ids and resolve when their condition has cleared."""
        self.rel_change, self.refresh_s, self._new_id = rel_change, refresh_s, new_id
        self._open: dict[str, dict] = {}
        self._emitted: dict[str, tuple[float, float | None, str]] = {}  # key -> (time, value, message)
        for alert in open_alerts:
            if not alert.get("resolved"):
                key = episode_key(alert["rule"], alert.get("layer"), alert.get("rank"))
                self._open[key] = dict(alert)
                self._emitted[key] = (float(alert.get("time") or 0.0), alert.get("value"), alert.get("message", ""))

    def update(
        self, findings: Sequence[Finding], *, epoch: int, step: int, now: float, checked: set[str]
    ) -> list[AlertEvent]:
        """Events to record for this round, in finding order, resolutions last.

        ``checked``: the rules evaluated this round (``rules.check`` returns them, a
        :class:`~tbhealth.health.findings.Checked`); an open alert resolves only when its episode
        is among ``checked.cleared`` (a plain set of rule ids: when its rule was checked and did
        not find it). Several findings with one key: the first wins.
        """
        events: list[AlertEvent] = []
        seen: set[str] = set()
        for f in findings:
            if f.key in seen:
                continue
            seen.add(f.key)
            alert = self._open.get(f.key)
            if alert is None and not f.firing:
                continue  # not yet cleared, but nothing is open: it never fired, or it resolved
            if alert is None:
                self._open[f.key] = self._fire(f, epoch, step, now)
                events.append(AlertEvent(self._emit(f.key, now), starts_episode=True))
                continue
            previous = dict(alert)
            alert.update(
                severity=f.severity,
                message=f.message,
                value=_json_number(f.value),
                threshold=_json_number(f.threshold),
                action=f.action,
                layer=f.layer,
                **_details(f),
            )
            if self._worth_recording(f.key, previous, alert, now):
                events.append(AlertEvent(self._emit(f.key, now)))
        cleared = getattr(checked, "cleared", None)
        done = [k for k, a in self._open.items()
                if k not in seen and (k in cleared if cleared is not None else a["rule"] in checked)]
        for key in done:
            alert = self._open.pop(key)
            self._emitted.pop(key, None)
            alert.update(resolved=True, resolved_time=now, resolved_step=step, resolved_epoch=epoch)
            if cleared:
                alert["message"] = cleared[key]  # what cleared, never the firing condition
            events.append(AlertEvent(dict(alert)))
        return events

    def active(self) -> list[dict]:
        """Open alerts, latest state of each (also updates not yet recorded), oldest first."""
        return [dict(a) for a in self._open.values()]

    def _fire(self, f: Finding, epoch: int, step: int, now: float) -> dict:
        alert = {
            "id": self._new_id(f.rule),
            "rule": f.rule,
            "severity": f.severity,
            "message": f.message,
            "epoch": epoch,
            "step": step,
            "time": now,
            "layer": f.layer,
            "value": _json_number(f.value),
            "threshold": _json_number(f.threshold),
            "resolved": False,
            "action": f.action,
            **_details(f),
        }
        if f.rank is not None:
            alert["rank"] = f.rank
        return alert

    def _worth_recording(self, key: str, previous: dict, alert: dict, now: float) -> bool:
        """Record at once what a reader must see (value moved a lot, severity/action/threshold
        changed); record small drifts at most every ``refresh_s``; never record identical rounds."""
        last_time, last_value, last_message = self._emitted[key]
        if any(previous[k] != alert[k] for k in ("severity", "action", "threshold", "layer")):
            return True
        if _layer_names(previous) != _layer_names(alert):  # a layer joined or left the episode
            return True
        if _moved(last_value, alert["value"], self.rel_change):
            return True
        changed = alert["message"] != last_message or alert["value"] != last_value
        return changed and now - last_time >= self.refresh_s

    def _emit(self, key: str, now: float) -> dict:
        alert = self._open[key]
        self._emitted[key] = (now, alert["value"], alert["message"])
        return dict(alert)


def _details(f: Finding) -> dict:
    """The optional parts of a record: ``layers`` (per-layer rules) and ``stack`` (stalled)."""
    out: dict = {}
    if f.layers:
        out["layers"] = [{"layer": name, "value": _json_number(value)} for name, value in f.layers]
    if f.stack:
        out["stack"] = f.stack
    return out


def _layer_names(alert: dict) -> list[str]:
    return [entry["layer"] for entry in alert.get("layers", ())]


def health_score(active_alerts: Iterable[dict], warnings: int = 0, errors: int = 0) -> int:
    """0–100: 100 minus 40 per open critical alert, 15 per open warning alert, 2 per logged
    warning (at most 20) and 5 per logged error (at most 25); never below 0.

    ``warnings``/``errors`` count WARNING/ERROR log records of the run; they are capped so that a
    chatty but healthy run is not scored as broken, while open alerts are not capped.
    """
    score = 100
    for alert in active_alerts:
        if alert.get("resolved"):
            continue
        score -= CRITICAL_PENALTY if alert.get("severity") == "critical" else WARNING_PENALTY
    score -= min(LOGGED_WARNING_PENALTY * max(warnings, 0), LOGGED_WARNING_CAP)
    score -= min(LOGGED_ERROR_PENALTY * max(errors, 0), LOGGED_ERROR_CAP)
    return max(score, 0)

"""The status document of DESIGN.md, shaped in one place: built by the trainer, read by everyone.

One function per step of its life:

1. :func:`build_status`: a run's progress -> ``status.json`` (the monitor's heartbeat writes it);
2. :func:`effective_status`: the file as a reader sees it (``unresponsive`` when stale, the
   trainer's own word kept as ``reported_state``; ``RunDir.read_status`` applies it);
3. :func:`public_status`: what ``tbhealth status --json`` prints and ``GET status`` answers;
4. :func:`run_summary` (+ :func:`newest_first`): one row of ``tbhealth runs --json`` and of
   ``GET runs``, the same row for both.

The shapes are declared in :mod:`tbhealth.run.schema`. Pure functions: no I/O, no torch.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from tbhealth.run.states import FINAL_STATES, State, effective_state

if TYPE_CHECKING:  # the monitor's mutable progress; only its attributes are read here
    from tbhealth.monitor.progress import Progress

#: The per-epoch metrics every status carries (``metrics.<key>``), in display order.
METRIC_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
#: The TensorBoard scalar each is written under, once per epoch: ``train/loss``, ..., ``lr``.
METRIC_TAGS = {key: key.replace("_", "/", 1) for key in METRIC_KEYS}
#: States in which a run still has an ETA.
_ETA_STATES = (State.TRAINING.value, State.PAUSED.value, State.STARTING.value)


def estimate_eta(
    epoch_durations: list[float], epochs_done: int, total_epochs: int,
    epoch_elapsed: float, batch: int, batches: int | None,
) -> float | None:
    """Seconds left: the mean finished-epoch time for the epochs left, less the current one's part.

    Before any epoch has finished, the current epoch's pace (seconds per batch) stands in.
    None when there is nothing to go on yet.
    """
    remaining_epochs = total_epochs - epochs_done
    if remaining_epochs <= 0:
        return 0.0
    if epoch_durations:
        per_epoch = sum(epoch_durations[-10:]) / len(epoch_durations[-10:])
    elif batch > 0 and batches:
        per_epoch = epoch_elapsed / batch * batches
    else:
        return None
    if batches:
        done_fraction = min(batch / batches, 1.0)
        in_epoch_left = per_epoch * (1 - done_fraction)
    else:
        in_epoch_left = max(per_epoch - epoch_elapsed, 0.0)
    return max(0.0, in_epoch_left + per_epoch * (remaining_epochs - 1))


def estimate_steps_eta(active_s: float, steps_done: int, total_steps: int) -> float | None:
    """Seconds left of a run planned in optimizer steps: its mean time per step so far (validation
    included) for the steps left. None before the first step."""
    if steps_done >= total_steps:
        return 0.0
    if steps_done <= 0 or active_s <= 0:
        return None
    return active_s / steps_done * (total_steps - steps_done)


def metrics_with_deltas(history: list[dict]) -> dict[str, dict | None]:
    """Latest value of each epoch metric and its change from the previous epoch."""
    out: dict[str, dict | None] = {}
    for key in METRIC_KEYS:
        values = [h[key] for h in history if h.get(key) is not None]
        if not values:
            out[key] = None
            continue
        delta = values[-1] - values[-2] if len(values) > 1 else None
        out[key] = {"value": values[-1], "delta": delta}
    return out


def build_status(p: Progress, *, system: dict | None, alerts_active: int, health_score: int,
                 peer_failure: str | None = None, now: float | None = None) -> dict[str, Any]:
    """The status JSON of DESIGN.md (``updated_at`` is added by the writer).

    ``peer_failure``: under DDP, the message of another rank that crashed while this one may
    be blocked in a collective: a run that is not finished yet then reads ``failed`` with it.
    """
    now_m = time.monotonic() if now is None else now
    status = {
        "run": p.run,
        "state": p.state,
        "epoch": p.epoch,
        "total_epochs": p.total_epochs,
        "total_steps": p.total_steps,
        "epochs_done": p.epochs_done,
        "batch": p.batch,
        "batches_per_epoch": p.batches_per_epoch,
        "global_step": p.global_step,
        "started_at": p.started_at,
        "elapsed_s": round(p.active_seconds(now_m), 3),
        "eta_s": _eta(p, now_m),
        "last_step_at": p.last_step_time,
        "metrics": metrics_with_deltas(p.history),
        "system": system,
        "alerts_active": alerts_active,
        "health_score": health_score,
        "interventions": dict(p.interventions),
        "log_counts": {"warnings": p.warnings, "errors": p.errors},
        "world_size": p.world_size,
        "message": p.message,
        "run_dir": p.run_dir,
        "last_checkpoint": p.last_checkpoint,
        "resume_hint": p.resume_hint,
        "pid": p.pid,
        "host": p.host,
    }
    if p.device is not None:
        status["device"] = p.device
    if p.ranks:
        status["ranks"] = list(p.ranks)
    if peer_failure is not None and p.state not in FINAL_STATES:
        status["state"], status["message"] = State.FAILED.value, peer_failure
    return status


def _eta(p: Progress, now_m: float) -> float | None:
    """The sooner of the epoch and the step estimates, for a run planned in either or both
    (a Lightning ``Trainer`` with ``max_epochs`` and ``max_steps`` ends at whichever comes first)."""
    if p.state == State.COMPLETED.value:
        return 0.0
    if p.state not in _ETA_STATES:
        return None
    estimates = []
    if p.total_epochs is not None:
        in_epoch = p.epoch > p.epochs_done  # between two epochs, none of the next one is done yet
        estimates.append(estimate_eta(p.epoch_durations, p.epochs_done, p.total_epochs,
                                      p.epoch_active_seconds(now_m) if in_epoch else 0.0, p.batch if in_epoch else 0,
                                      p.batches_per_epoch))
    if p.total_steps is not None:
        estimates.append(estimate_steps_eta(p.active_seconds(now_m), p.global_step, p.total_steps))
    known = [e for e in estimates if e is not None]
    return round(min(known), 1) if known else None


def effective_status(status: Any, now: float | None = None) -> dict | None:
    """A status file as readers report it: ``state`` made effective (``unresponsive`` when its
    heartbeat is stale), the trainer's own word kept as ``reported_state``; None if unusable."""
    if not isinstance(status, dict) or "state" not in status:
        return None
    status["reported_state"] = status["state"]
    status["state"] = effective_state(status, now)
    return status


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats spelled as strings, so ``json.dumps(allow_nan=False)`` works."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def public_status(status: dict, run: str) -> dict:
    """What ``status --json`` prints: the status as read, named ``run``, without the file version.

    ``run`` is the name the CLI resolved (relative to the logdir), so it can be passed back to
    any other command; ``reported_state`` stays because it explains an ``unresponsive`` state.
    """
    out = {k: v for k, v in status.items() if k != "v"}
    out["run"] = run
    return json_safe(out)


_ALERT_KEYS = ("id", "rule", "severity", "message", "epoch", "step", "time", "layer", "value", "threshold", "resolved")


def public_alert(alert: dict) -> dict:
    """An alert record in the documented key order; absent keys become ``None`` (``resolved``: False)."""
    out = {k: alert.get(k) for k in _ALERT_KEYS}
    out["resolved"] = bool(alert.get("resolved", False))
    out.update({k: v for k, v in alert.items() if k not in out and k != "v"})
    return json_safe(out)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _count(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def progress_fraction(status: dict) -> float | None:
    """Share of the planned work done, 0..1, from epoch/batch counts or from steps of a run
    planned in steps (the larger where both are planned); None when unknown."""
    if status.get("state") == "completed":
        return 1.0
    known = [f for f in (_epoch_fraction(status), _step_fraction(status)) if f is not None]
    return max(known) if known else None


def _epoch_fraction(status: dict) -> float | None:
    epoch, total = _count(status.get("epoch")), _count(status.get("total_epochs"))
    if epoch is None or not total:
        return None
    done_epochs = max(0, min(epoch, total) - 1) if epoch else 0
    per_epoch = _count(status.get("batches_per_epoch"))
    batch = _count(status.get("batch")) or 0
    within = min(1.0, batch / per_epoch) if per_epoch and epoch else 0.0
    return max(0.0, min(1.0, (done_epochs + within) / total))


def _step_fraction(status: dict) -> float | None:
    step, total = _count(status.get("global_step")), _count(status.get("total_steps"))
    return min(1.0, step / total) if step is not None and total else None


def _metric_value(status: dict, name: str) -> Any:
    metric = (status.get("metrics") or {}).get(name)
    return metric.get("value") if isinstance(metric, dict) else None


def newest_first(rows: list[dict]) -> list[dict]:
    """``runs`` rows (``run_summary``) ordered as both ``tbhealth runs`` and the Health tab show
    them: by start time, newest first (a status without one: its last heartbeat less its elapsed
    time; neither: last), then by name."""

    def started(row: dict) -> float:
        if row.get("started_at") is not None:
            return row["started_at"]
        return (row.get("updated_at") or 0.0) - (row.get("elapsed_s") or 0.0)

    return sorted(rows, key=lambda row: (-started(row), row["run"]))


def run_summary(run: str, path: str, status: dict | None) -> dict:
    """One row of ``runs --json`` and of the Health tab's ``GET runs``; a run whose status cannot
    be read is listed as ``unknown``. ``reported_state`` explains an ``unresponsive`` run."""
    s = status or {}
    started = _num(s.get("started_at"))
    return json_safe({
        "run": run,
        "path": path,
        "state": s.get("state", "unknown") if status else "unknown",
        "reported_state": s.get("reported_state"),
        "epoch": _count(s.get("epoch")),
        "total_epochs": _count(s.get("total_epochs")),
        "batch": _count(s.get("batch")),
        "batches_per_epoch": _count(s.get("batches_per_epoch")),
        "progress": progress_fraction(s) if status else None,
        "elapsed_s": _num(s.get("elapsed_s")),
        "eta_s": _num(s.get("eta_s")),
        "started_at": started,
        "updated_at": _num(s.get("updated_at")),
        "val_loss": _num(_metric_value(s, "val_loss")),
        "val_acc": _num(_metric_value(s, "val_acc")),
        "alerts_active": _count(s.get("alerts_active")),
        "health_score": _num(s.get("health_score")),
    })

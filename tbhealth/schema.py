"""The JSON shapes tbhealth promises to outside tools, written down once as data.

``status --json`` prints a :class:`Status`, ``alerts --json`` a list of :class:`Alert`,
``runs --json`` a list of :class:`RunSummary`. The trainer (through ``Monitor``) writes
``status.json`` as a :class:`Status` too, so the file and the command agree field for field.

The shapes are ``TypedDict``s so writers can annotate with them at no cost; the ``validate_*``
functions check a value against them with pydantic (strict types, unknown keys refused except
where noted), imported only when a validation is asked for so the CLI stays quick to start.

Conventions, decided here once:

* Times are Unix seconds (float); durations seconds; sizes bytes; rates bytes per second.
* ``epoch`` is the epoch in progress, 1-based (0 before the first starts); ``batch`` counts the
  batches finished in it. A completed run has ``epoch == total_epochs`` and
  ``batch == batches_per_epoch``. ``batches_per_epoch`` is ``None`` when the loader has no length.
* Accuracies are fractions in [0, 1]; displays show them as percentages.
* A metric is ``{"value": v, "delta": d}``: ``d`` is the change from the previous epoch's value,
  ``None`` in the first epoch; the metric itself is ``None`` until it has been measured.
* Strict JSON output cannot hold NaN or infinities, and a NaN loss is the very thing a user must
  see, so command output writes them as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
  (the file itself may hold Python's bare ``NaN``; both validate).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from typing_extensions import NotRequired, TypedDict

from tbhealth.runstate import STATES, UNRESPONSIVE

__all__ = [
    "Status", "Metric", "Metrics", "System", "Gpu", "Interventions", "LogCounts", "RankInfo", "Alert",
    "RunSummary", "SchemaError", "SEVERITIES", "READ_STATES",
    "validate_status", "validate_alert", "validate_run_summary",
    "public_status", "public_alert", "run_summary", "progress_fraction", "json_safe",
]

#: States a reader can report: the trainer's own, plus ``unresponsive`` for a stale heartbeat.
READ_STATES = (*STATES, UNRESPONSIVE)
SEVERITIES = ("info", "warning", "critical")

State = Literal["starting", "training", "paused", "stopping", "stopped", "completed", "failed", "unresponsive"]
if set(State.__args__) != set(READ_STATES):  # pragma: no cover - guards a runstate change
    raise ImportError("tbhealth.schema.State is out of step with runstate.STATES")

NonFinite = Literal["NaN", "Infinity", "-Infinity"]
Real = Union[float, NonFinite]  # strict float accepts ints too
Count = Annotated[int, at.Ge(0)]
Seconds = Annotated[float, at.Ge(0)]
Bytes = Annotated[int, at.Ge(0)]
Rate = Annotated[float, at.Ge(0)]
Percent = Annotated[float, at.Ge(0)]  # process CPU % passes 100 on several cores

_STRICT = {"strict": True, "extra": "forbid"}
_OPEN = {"strict": True, "extra": "allow"}


class Metric(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    value: Real
    delta: Real | None


class Metrics(TypedDict):
    """The five below are required (``None`` until measured); further keys must also be Metrics."""

    __pydantic_config__ = _OPEN  # type: ignore[misc]
    train_loss: Metric | None
    train_acc: Metric | None
    val_loss: Metric | None
    val_acc: Metric | None
    lr: Metric | None


class Gpu(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    name: str
    memory_used_bytes: Bytes
    memory_total_bytes: Bytes
    utilization_percent: Annotated[float, at.Ge(0), at.Le(100)]
    #: torch's caching-allocator figures; ``None`` unless the program itself initialised CUDA.
    torch_allocated_bytes: Bytes | None
    torch_reserved_bytes: Bytes | None


class System(TypedDict):
    """What :class:`tbhealth.system.SystemSampler` reports; ``ram_used_bytes`` is total − available."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    cpu_percent: Annotated[float, at.Ge(0), at.Le(100)]
    process_cpu_percent: Percent
    ram_used_bytes: Bytes
    ram_total_bytes: Bytes
    process_rss_bytes: Bytes
    disk_read_bps: Rate | None  # None: the OS gives no disk counters
    disk_write_bps: Rate | None
    gpu: Gpu | None  # None: no GPU, or NVML unavailable


class Interventions(TypedDict):
    """Control requests the run carried out (acknowledged ``done``)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    pauses: Count
    stops: Count
    checkpoints: Count
    resumes: NotRequired[Count]


class LogCounts(TypedDict):
    """WARNING and ERROR records the run logged so far."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    warnings: Count
    errors: Count


class RankInfo(TypedDict):
    """One rank of a distributed run; rank 0 gathers these. Further keys are allowed."""

    __pydantic_config__ = _OPEN  # type: ignore[misc]
    rank: Count
    host: NotRequired[str]
    system: NotRequired[System | None]


class Status(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    run: str
    state: State
    epoch: Count
    total_epochs: Count
    batch: Count
    batches_per_epoch: Count | None
    global_step: Count
    elapsed_s: Seconds
    eta_s: Seconds | None  # None: not estimable yet
    updated_at: float
    metrics: Metrics
    system: System | None  # None: system sampling turned off
    alerts_active: Count
    health_score: Annotated[float, at.Ge(0), at.Le(100)]
    interventions: Interventions
    # -- optional ------------------------------------------------------------------------------
    started_at: NotRequired[float]
    epochs_done: NotRequired[Count]  # finished epochs (== epoch - 1 while one is in progress)
    last_step_at: NotRequired[float]  # when the last optimizer step finished
    log_counts: NotRequired[LogCounts]
    run_dir: NotRequired[str]  # absolute path of the run directory
    world_size: NotRequired[Annotated[int, at.Ge(1)]]
    ranks: NotRequired[list[RankInfo]]
    device: NotRequired[str]  # e.g. "cpu", "cuda:0"
    message: NotRequired[str | None]  # why the run failed or stopped, one line
    last_checkpoint: NotRequired[str | None]  # file name under checkpoints/
    pid: NotRequired[int]
    host: NotRequired[str]
    #: Added by readers: the state the trainer wrote, kept when ``state`` became ``unresponsive``.
    reported_state: NotRequired[State]
    #: The file's format version (``runstate.FORMAT_VERSION``); command output leaves it out.
    v: NotRequired[int]


class Alert(TypedDict):
    """One alert episode (latest state). Further keys the health engine records are allowed."""

    __pydantic_config__ = _OPEN  # type: ignore[misc]
    id: str
    rule: str
    severity: Literal["info", "warning", "critical"]
    message: str
    epoch: Count | None
    step: Count | None
    time: float
    layer: str | None  # None where the rule is not per layer
    value: Real | None
    threshold: Real | None
    resolved: bool


class RunSummary(TypedDict):
    """One row of ``runs --json``. ``state`` is ``unknown`` when the status file is unreadable."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    run: str
    path: str
    state: Literal[State, "unknown"]
    epoch: Count | None
    total_epochs: Count | None
    batch: Count | None
    batches_per_epoch: Count | None
    progress: Annotated[float, at.Ge(0), at.Le(1)] | None
    elapsed_s: Seconds | None
    eta_s: Seconds | None
    started_at: float | None
    updated_at: float | None
    val_loss: Real | None
    val_acc: Real | None
    alerts_active: Count | None
    health_score: Annotated[float, at.Ge(0), at.Le(100)] | None


# --------------------------------------------------------------------------- validation


class SchemaError(ValueError):
    """A value that does not have the documented shape; the message lists each wrong field."""


_adapters: dict[type, Any] = {}


def _validate(shape: type, obj: Any) -> dict:
    from pydantic import TypeAdapter, ValidationError

    adapter = _adapters.get(shape)
    if adapter is None:
        adapter = _adapters[shape] = TypeAdapter(shape)
    try:
        adapter.validate_python(obj)
    except ValidationError as e:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']} (got {err.get('input')!r:.60})"
            for err in e.errors()
        ]
        raise SchemaError(f"not a valid {shape.__name__}:\n  " + "\n  ".join(problems)) from None
    return obj


def validate_status(obj: Any) -> dict:
    """``obj`` unchanged if it is a :class:`Status`, else :class:`SchemaError`."""
    _validate(Status, obj)
    for key, metric in obj["metrics"].items():
        if key not in Metrics.__annotations__ and metric is not None:
            try:
                _validate(Metric, metric)
            except SchemaError as e:
                raise SchemaError(f"metrics.{key}: {e}") from None
    return obj


def validate_alert(obj: Any) -> dict:
    return _validate(Alert, obj)


def validate_run_summary(obj: Any) -> dict:
    return _validate(RunSummary, obj)


# --------------------------------------------------------------------------- building output


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
    """Share of the planned work done, 0..1, from epoch/batch counts; None when unknown."""
    if status.get("state") == "completed":
        return 1.0
    epoch, total = _count(status.get("epoch")), _count(status.get("total_epochs"))
    if epoch is None or not total:
        return None
    done_epochs = max(0, min(epoch, total) - 1) if epoch else 0
    per_epoch = _count(status.get("batches_per_epoch"))
    batch = _count(status.get("batch")) or 0
    within = min(1.0, batch / per_epoch) if per_epoch and epoch else 0.0
    return max(0.0, min(1.0, (done_epochs + within) / total))


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
    """One ``runs --json`` row; a run whose status cannot be read is listed as ``unknown``."""
    s = status or {}
    started = _num(s.get("started_at"))
    return json_safe({
        "run": run,
        "path": path,
        "state": s.get("state", "unknown") if status else "unknown",
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

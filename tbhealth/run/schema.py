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

from typing import Annotated, Any, Literal, Union

import annotated_types as at
from typing_extensions import NotRequired, TypedDict

from tbhealth.health.ids import SEVERITIES
from tbhealth.run.states import READ_STATES

__all__ = [
    "Status", "Metric", "Metrics", "System", "Gpu", "Interventions", "LogCounts", "RankInfo", "Alert",
    "RunSummary", "SchemaError", "validate_status", "validate_alert", "validate_run_summary",
]

#: States a reader can report: the trainer's own, plus ``unresponsive`` for a stale heartbeat.
State = Literal[READ_STATES]  # type: ignore[valid-type]
Severity = Literal[SEVERITIES]  # type: ignore[valid-type]

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
    """What :class:`tbhealth.monitor.system.SystemSampler` reports; ``ram_used_bytes`` is total − available."""

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
    total_epochs: Count | None  # None: the run is planned in steps (``total_steps``)
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
    total_steps: NotRequired[Count | None]  # planned optimizer steps; None: planned in epochs
    last_step_at: NotRequired[float]  # when the last optimizer step finished
    log_counts: NotRequired[LogCounts]
    run_dir: NotRequired[str]  # absolute path of the run directory
    world_size: NotRequired[Annotated[int, at.Ge(1)]]
    ranks: NotRequired[list[RankInfo]]
    device: NotRequired[str]  # e.g. "cpu", "cuda:0"
    message: NotRequired[str | None]  # why the run failed or stopped, one line
    last_checkpoint: NotRequired[str | None]  # file name under checkpoints/
    resume_hint: NotRequired[str | None]  # how to continue this run after a stop, in its loop's terms
    pid: NotRequired[int]
    host: NotRequired[str]
    #: Added by readers: the state the trainer wrote, kept when ``state`` became ``unresponsive``.
    reported_state: NotRequired[State]
    #: The file's format version (``tbhealth.run.files.FORMAT_VERSION``); command output leaves it out.
    v: NotRequired[int]


class Alert(TypedDict):
    """One alert episode (latest state). Further keys the health engine records are allowed."""

    __pydantic_config__ = _OPEN  # type: ignore[misc]
    id: str
    rule: str
    severity: Severity
    message: str
    epoch: Count | None
    step: Count | None
    time: float
    layer: str | None  # None where the rule is not per layer
    value: Real | None
    threshold: Real | None
    resolved: bool


class RunSummary(TypedDict):
    """One row of ``runs --json``. ``state`` is ``unknown`` when the status file is unreadable
    (``error`` says why)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    run: str
    path: str
    state: Literal[State, "unknown"]
    reported_state: State | None  # what the trainer last wrote (explains ``unresponsive``)
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
    #: Why the status could not be read (then ``state`` is ``unknown``); absent otherwise.
    error: NotRequired[str]


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

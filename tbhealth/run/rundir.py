"""One run's directory: where each piece of run state lives, and typed reads and writes of it.

The trainer, the CLI and the TensorBoard plugin all go through :class:`RunDir`, so the format
can change in one place. It imports nothing heavy (no torch): the plugin uses it.

Layout of ``<logdir>/<run>/``::

    events.out.tfevents.*          TensorBoard event files (written by tbhealth.monitor.events)
    config.yaml                    the resolved config
    checkpoints/*.pt               checkpoints (tbhealth.training.checkpoint)
    plugins/tbhealth/status.json   heartbeat snapshot, replaced atomically
    plugins/tbhealth/log.jsonl     log records, append-only
    plugins/tbhealth/alerts.jsonl  alert events, append-only (a later record with the same id wins)
    plugins/tbhealth/control.jsonl control requests, append-only (CLI and plugin write)
    plugins/tbhealth/acks.jsonl    acknowledgements of control requests, append-only (trainer writes)
    plugins/tbhealth/health.json   the run's health settings (thresholds, actions), written at start
    plugins/tbhealth/layers.json   the model's measured layers in model order, written at start

How each file is written (atomic snapshots, locked appends, the version ``v``) is
:mod:`tbhealth.run.files`; the states a status may hold are :mod:`tbhealth.run.states`.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbhealth.run.files import FORMAT_VERSION, append_record, file_size, read_json, read_records, write_json_atomic
from tbhealth.run.states import COMMANDS, effective_state

STATE_SUBDIR = Path("plugins") / "tbhealth"
CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class ControlRequest:
    """A request as read back by the trainer. ``error`` is set for a line it must reject."""

    id: str
    command: str
    source: str = ""
    time: float = 0.0
    error: str | None = None


class RunDir:
    """Paths and typed reads/writes of one run's state. Cheap to construct; holds no open files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state_dir = self.path / STATE_SUBDIR
        self.status_path = self.state_dir / "status.json"
        self.log_path = self.state_dir / "log.jsonl"
        self.alerts_path = self.state_dir / "alerts.jsonl"
        self.control_path = self.state_dir / "control.jsonl"
        self.acks_path = self.state_dir / "acks.jsonl"
        self.rank_failures_path = self.state_dir / "rank_failures.jsonl"
        self.health_settings_path = self.state_dir / "health.json"
        self.layers_path = self.state_dir / "layers.json"
        self.config_path = self.path / CONFIG_FILE
        self.checkpoint_dir = self.path / CHECKPOINT_SUBDIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def exists(self) -> bool:
        return self.status_path.is_file()

    # -- status -------------------------------------------------------------------------------

    def write_status(self, status: dict) -> None:
        write_json_atomic(self.status_path, {"v": FORMAT_VERSION, **status, "updated_at": time.time()})

    def read_status(self, now: float | None = None) -> dict | None:
        """The last heartbeat with ``state`` made effective: ``unresponsive`` when stale.

        The state the trainer wrote stays available as ``reported_state``.
        """
        status = read_json(self.status_path)
        if not isinstance(status, dict) or "state" not in status:
            return None
        status["reported_state"] = status["state"]
        status["state"] = effective_state(status, now)
        return status

    # -- health settings --------------------------------------------------------------------

    def write_health_settings(self, settings: dict) -> None:
        """The run's resolved ``health:`` settings, written once at start, so readers (the Health
        tab) judge and colour with this run's own thresholds, not the defaults."""
        write_json_atomic(self.health_settings_path, {"v": FORMAT_VERSION, "health": settings})

    def read_health_settings(self) -> dict | None:
        doc = read_json(self.health_settings_path)
        health = doc.get("health") if isinstance(doc, dict) else None
        return health if isinstance(health, dict) else None

    # -- layers -------------------------------------------------------------------------------

    def write_layers(self, names: list[str]) -> None:
        """The names of the layers the health instruments measure, in model order
        (``named_modules()`` order), written once at start. TensorBoard lists the per-layer series
        ``health/<metric>/<layer>`` in an order of its own (the Rust data server's is arbitrary);
        the Health tab's per-layer view orders its rows by this list."""
        write_json_atomic(self.layers_path, {"v": FORMAT_VERSION, "layers": [str(n) for n in names]})

    def read_layers(self) -> list[str] | None:
        """The layer names in model order, or None when the run did not write them."""
        doc = read_json(self.layers_path)
        layers = doc.get("layers") if isinstance(doc, dict) else None
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            return None
        return layers

    # -- log ----------------------------------------------------------------------------------

    def append_log(self, level: str, message: str, t: float | None = None, **extra: Any) -> None:
        level = level.upper()
        append_record(self.log_path, {"time": t or time.time(), "level": level, "message": message, **extra})

    def read_log(self, offset: int = 0) -> tuple[list[dict], int]:
        records, new_offset = read_records(self.log_path, offset)
        return [r for r in records if "_malformed" not in r], new_offset

    # -- alerts -------------------------------------------------------------------------------

    def append_alert(self, alert: dict) -> None:
        """Record an alert event: fired, updated or resolved. Same ``id`` → same episode."""
        append_record(self.alerts_path, alert)

    def read_alerts(self) -> list[dict]:
        """Alert episodes, latest state of each, oldest first."""
        records, _ = read_records(self.alerts_path)
        by_id: dict[str, dict] = {}
        for r in records:
            if "_malformed" in r or "id" not in r:
                continue
            r.pop("v", None)
            by_id[r["id"]] = {**by_id.get(r["id"], {}), **r}
        return list(by_id.values())

    # -- control ------------------------------------------------------------------------------

    def request_control(self, command: str, source: str = "cli") -> str:
        """Append a control request; returns its id. The trainer acknowledges it in acks.jsonl."""
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
        rid = uuid.uuid4().hex[:12]
        append_record(self.control_path, {"id": rid, "command": command, "source": source, "time": time.time()})
        return rid

    def control_size(self) -> int:
        return file_size(self.control_path)

    def read_control(self, offset: int = 0) -> tuple[list[ControlRequest], int]:
        """New requests from ``offset``; malformed lines come back with ``error`` set."""
        records, new_offset = read_records(self.control_path, offset)
        out = []
        for i, r in enumerate(records):
            out.append(_parse_request(r, f"{offset}-{i}"))
        return out, new_offset

    def acknowledge(self, request_id: str, status: str, detail: str = "", **extra: Any) -> None:
        """``status`` is ``done`` or ``rejected``; ``detail`` says what happened or why not."""
        append_record(
            self.acks_path,
            {"id": request_id, "status": status, "detail": detail, "time": time.time(), **extra},
        )

    def read_acks(self) -> dict[str, dict]:
        records, _ = read_records(self.acks_path)
        return {r["id"]: r for r in records if "id" in r and "_malformed" not in r}

    def wait_for_ack(self, request_id: str, timeout: float, poll: float = 0.05) -> dict | None:
        """The acknowledgement of ``request_id``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        offset = 0
        while True:
            records, offset = read_records(self.acks_path, offset)
            for r in records:
                if r.get("id") == request_id:
                    return r
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)

    # -- distributed ----------------------------------------------------------------------------

    def record_rank_failure(self, rank: int, message: str) -> None:
        """A rank other than 0 crashed: rank 0's heartbeat must report ``failed`` with this."""
        append_record(self.rank_failures_path, {"rank": rank, "message": message, "time": time.time()})

    def rank_failures(self) -> list[dict]:
        if not file_size(self.rank_failures_path):  # the common case costs one stat
            return []
        records, _ = read_records(self.rank_failures_path)
        return [r for r in records if "rank" in r]

    # -- checkpoints --------------------------------------------------------------------------

    def list_checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first by modification time."""
        try:
            files = [p for p in self.checkpoint_dir.iterdir()
                     if p.suffix == ".pt" and p.is_file() and not p.is_symlink()]
        except OSError:
            return []
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def checkpoint_file(self, name: str) -> Path | None:
        """The checkpoint called ``name`` in this run, or None; never a path outside it."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}\.pt", name or "") or name.startswith("."):
            return None
        path = self.checkpoint_dir / name
        # a symlink could point anywhere: never serve one
        return path if path.is_file() and not path.is_symlink() else None


def _parse_request(r: dict, fallback_id: str) -> ControlRequest:
    if "_malformed" in r:
        return ControlRequest(id=f"malformed-{fallback_id}", command="", error=f"not a JSON object: {r['_malformed'][:80]!r}")
    rid = r.get("id")
    if not isinstance(rid, str) or not rid:
        rid = f"noid-{fallback_id}"
        return ControlRequest(id=rid, command=str(r.get("command")), error="request has no id")
    command = r.get("command")
    if command not in COMMANDS:
        return ControlRequest(id=rid, command=str(command), error=f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
    return ControlRequest(id=rid, command=command, source=str(r.get("source", "")), time=float(r.get("time") or 0))


__all__ = ["STATE_SUBDIR", "CHECKPOINT_SUBDIR", "CONFIG_FILE", "RunDir", "ControlRequest"]

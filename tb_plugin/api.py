"""What each Health-tab route answers, as pure functions of the logdir and the parsed request.

The werkzeug handlers in ``plugin.py`` only parse requests and serialise answers; everything a
test wants to check lives here and reads run state through ``tbhealth.run`` alone. A bad
request raises ``ApiError`` with the HTTP status and a message that says what to fix.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tbhealth.run.files import file_size
from tbhealth.run.names import RunNameError, list_run_dirs, resolve_run, run_name
from tbhealth.run.rundir import RunDir, RunNotLiveError
from tbhealth.run.states import COMMANDS, is_live
from tbhealth.run.status import json_safe, newest_first, progress_fraction, public_alert, public_status, run_summary

#: Newest log records sent when a client starts from offset 0 on a long log.
MAX_LOG_RECORDS = 1000
_MAX_OFFSET = 2**53
_DIGITS = re.compile(r"^[0-9]{1,17}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ApiError(Exception):
    """A request the route refuses; ``status`` is the HTTP code (4xx), ``message`` says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- request parsing


def open_run(logdir: str | None, run: Any) -> tuple[RunDir, str]:
    """The run's directory and canonical name; 400 for a name that could leave the logdir, 404
    when no tbhealth run lives there."""
    if not logdir:
        raise ApiError(404, "the Health tab needs TensorBoard started with --logdir (not --logdir_spec)")
    if run is None or run == "":
        raise ApiError(400, "missing parameter 'run' (a run name as listed by GET runs)")
    if not isinstance(run, str):
        raise ApiError(400, "parameter 'run' must be a string")
    try:
        path = resolve_run(logdir, run)
    except RunNameError as e:
        raise ApiError(400, str(e)) from None
    rd = RunDir(path)
    if not rd.exists():
        raise ApiError(404, f"no tbhealth run {run!r} under the logdir")
    return rd, run_name(logdir, path)


@contextmanager
def state_files(name: str, code: int = 404) -> Iterator[None]:
    """A run-state file that must not be used (a symlink, a FIFO, unreadable) becomes a 4xx that
    names the file and says why, instead of a 500: the run is damaged, the plugin is fine."""
    try:
        yield
    except OSError as e:
        raise ApiError(code, f"run {name!r}: {e}") from None


def parse_offset(value: str | None, name: str) -> int:
    """A non-negative integer query parameter; absent means 0."""
    if value is None or value == "":
        return 0
    if not _DIGITS.match(value) or int(value) > _MAX_OFFSET:
        raise ApiError(400, f"parameter {name!r} must be a non-negative integer, got {value[:40]!r}")
    return int(value)


# --------------------------------------------------------------------------- runs and status


_run_dirs: dict[Path, RunDir] = {}


def _run_dir(path: Path) -> RunDir:
    """``RunDir(path)``, kept: building its nine paths for 500 runs on every poll costs ~30 ms."""
    rd = _run_dirs.get(path)
    if rd is None:
        if len(_run_dirs) > 20_000:
            _run_dirs.clear()
        rd = _run_dirs[path] = RunDir(path)
    return rd


def runs_impl(logdir: str | None, now: float | None = None) -> dict:
    """Every tbhealth run under the logdir, newest first. Reads one status file per run.

    Names are the paths relative to the logdir, as ``run_name`` gives them; computed
    without its symlink resolution because ``list_run_dirs`` never follows symlinks (twice as
    fast with hundreds of runs).
    """
    if not logdir:
        return {"runs": [], "server_time": time.time(), "logdir": None}
    now = time.time() if now is None else now
    root = Path(logdir)
    rows = []
    for path in list_run_dirs(root):
        status, error = _run_dir(path).read_status_checked(now)
        if status is not None or error:  # no status yet: not a run to show
            row = run_summary(path.relative_to(root).as_posix(), str(path), status)
            rows.append(row | {"error": error} if error else row)
    return {"runs": newest_first(rows), "server_time": now}


def status_impl(logdir: str | None, run: Any, now: float | None = None) -> dict:
    """The run's status snapshot (DESIGN's ``status --json``), state made effective, plus the
    server clock so the page can count the ETA down without trusting the browser's clock."""
    rd, name = open_run(logdir, run)
    now = time.time() if now is None else now
    status, error = rd.read_status_checked(now)
    if error:
        raise ApiError(404, f"run {name!r} has an unreadable status: {error}")
    if status is None:
        raise ApiError(404, f"run {name!r} has no readable status yet; retry in a moment")
    out = public_status(status, name)
    out["progress"] = progress_fraction(status)
    out["server_time"] = now
    return out


# --------------------------------------------------------------------------- alerts and logs


def alerts_impl(logdir: str | None, run: Any, after: int = 0) -> dict:
    """Alert episodes that appeared or changed since the client's ``cursor``; all when 0.

    The cursor is the size of the alert record stream the client has seen: records appended
    after it name the episodes to resend, each in its latest merged form (a resolved alert
    comes back with ``resolved: true``). A cursor past the end (a replaced file) starts over.
    """
    rd, name = open_run(logdir, run)
    size = file_size(rd.alerts_path)
    if after > size:
        after = 0
    with state_files(name):
        changed, cursor = rd.alert_ids_after(after)
        merged = [a for a in rd.read_alerts() if a["id"] in changed] if changed else []
    return {"alerts": [public_alert(a) for a in merged], "cursor": cursor}


def logs_impl(logdir: str | None, run: Any, offset: int = 0) -> dict:
    """Log records written since byte ``offset`` and the offset to ask from next time.

    A first request on a long log gets only the newest ``MAX_LOG_RECORDS`` (``skipped`` says how
    many lines were left out): the page shows a tail, not days of history, and the file is read
    from its end, so a 40 MB log costs its last 1000 lines, not a parse of 40 MB.
    """
    rd, name = open_run(logdir, run)
    if offset > file_size(rd.log_path):
        offset = 0
    with state_files(name):
        records, new_offset, skipped = rd.read_log_tail(offset, MAX_LOG_RECORDS)
    records = [json_safe({k: v for k, v in r.items() if k != "v"}) for r in records]
    return {"records": records, "offset": new_offset, "skipped": skipped}


# --------------------------------------------------------------------------- checkpoints and control


def checkpoint_impl(logdir: str | None, run: Any, name: Any) -> tuple[IO[bytes], int]:
    """The checkpoint to stream, opened once (no symlink followed, a regular file) and its size
    from that same descriptor: a file swapped for a link meanwhile cannot be what is sent."""
    rd, run_name = open_run(logdir, run)
    if not isinstance(name, str) or not name:
        raise ApiError(400, "missing parameter 'name' (a checkpoint file name such as 'epoch-3.pt')")
    if len(name) > 255:
        raise ApiError(400, "checkpoint name longer than 255 characters")
    fd = rd.open_checkpoint(name)
    if fd is None:
        raise ApiError(404, f"run {run_name!r} has no checkpoint {name[:100]!r}")
    size = os.fstat(fd).st_size
    return os.fdopen(fd, "rb"), size


def control_impl(logdir: str | None, body: Any, read_only: bool) -> dict:
    """Queue a control request for a live run. Guards on headers/origin ran before this."""
    if read_only:
        raise ApiError(403, "TensorBoard runs with --tbhealth_read_only: controls are disabled")
    if not isinstance(body, dict):
        raise ApiError(400, 'body must be a JSON object like {"run": "r1", "command": "pause"}')
    command = body.get("command")
    if command not in COMMANDS:
        raise ApiError(400, f"unknown command {str(command)[:40]!r}; allowed: {', '.join(COMMANDS)}")
    rd, name = open_run(logdir, body.get("run"))
    try:
        with state_files(name, code=409):
            rid = rd.send_control(command, source="tensorboard")
    except RunNotLiveError as e:
        raise ApiError(409, f"run {name!r} is {e.state} ({e.why}): only a starting, training or paused "
                            f"run can {command}") from None
    return {"id": rid, "run": name, "command": command}


def _checkpoint_name(rd: RunDir, ack: dict) -> str | None:
    for key in ("checkpoint", "file", "path"):
        value = ack.get(key)
        if isinstance(value, str) and value:
            name = Path(value).name
            return name if rd.checkpoint_file(name) is not None else None
    return None


def ack_impl(logdir: str | None, run: Any, request_id: Any) -> dict:
    """What became of a control request: ``pending``, ``done`` or ``rejected`` (+ ``detail``).

    A request that a run which has meanwhile ended never acknowledged is reported ``rejected``
    so the page stops waiting.
    """
    rd, name = open_run(logdir, run)
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise ApiError(400, "parameter 'id' must be the id returned by POST control")
    with state_files(name):
        ack = rd.read_acks().get(request_id)
    if ack is not None:
        out = {"id": request_id, "status": ack.get("status", "done"), "detail": ack.get("detail", "")}
        checkpoint = _checkpoint_name(rd, ack)
        if checkpoint:
            out["checkpoint"] = checkpoint
        return out
    with state_files(name):
        requests, _ = rd.read_control(0)
    if not any(r.id == request_id for r in requests):
        raise ApiError(404, f"run {name!r} has no control request {request_id!r}")
    status = rd.read_status()
    state = status["state"] if status else "unknown"
    if not is_live(state):
        return {"id": request_id, "status": "rejected", "detail": f"the run is {state} and did not acknowledge the request"}
    return {"id": request_id, "status": "pending", "detail": ""}


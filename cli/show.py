"""Read-only commands: ``status``, ``alerts`` and ``runs``.

They only read run state through ``tbhealth.run``, so they are safe to run at any time,
from any number of shells, against live or finished runs. ``--json`` output has the shapes in
``tbhealth.run.schema`` and is strict JSON (no bare NaN), one document on stdout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from tbhealth.run.names import list_run_dirs, run_name

from tbhealth.run.rundir import RunDir
from tbhealth.run.status import newest_first, public_alert, public_status, run_summary
from tbhealth_cli.common import (
    DEFAULT_LOGDIR, ExitCode, JsonOpt, LogdirOpt, RunArg, console, err_console, fail, find_run,
)

LogdirArg = Annotated[
    Path,
    typer.Argument(
        envvar="TBHEALTH_LOGDIR",
        help="Folder that holds the runs ($TBHEALTH_LOGDIR when set).",
        show_default=True,
    ),
]


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, allow_nan=False))


def _display_name(rd: RunDir, logdir: Path) -> str:
    """The run's name under ``logdir``, or its path when it lives elsewhere."""
    name = run_name(logdir, rd.path)
    return os.fspath(rd.path) if name == ".." or name.startswith("../") else name


def _read_status(rd: RunDir, name: str) -> dict:
    status, error = rd.read_status_checked()
    if error:
        fail(f"run {name!r} has an unreadable status: {error}", code=ExitCode.FAILED,
             hint=f"Its other files may still tell what happened: {rd.log_path}.")
    if status is None:
        fail(
            f"run {name!r} has no readable status file yet ({rd.status_path})",
            code=ExitCode.FAILED,
            hint="A starting run writes it within a few seconds; try again shortly. "
            f"If it never appears, the trainer died early: its log is {rd.log_path}.",
        )
    return status


def status(run: RunArg, logdir: LogdirOpt = Path(DEFAULT_LOGDIR), json_: JsonOpt = False) -> None:
    """Show a run's progress, metrics, hardware and health.

    Examples: [bold]tbhealth status mnist[/] · [bold]tbhealth status runs/mnist --json[/]
    """
    rd = find_run(run, logdir)
    name = _display_name(rd, logdir)
    st = _read_status(rd, name)
    if json_:
        _echo_json(public_status(st, name))
        return
    try:
        alerts_ = rd.read_alerts()
    except OSError as e:
        alerts_ = []
        err_console.print(f"alerts not shown: {e}", markup=False, soft_wrap=True)
    from tbhealth_cli import render  # Rich tables: loaded by the commands that draw them, not by `train`

    render.print_status(console, st, name, alerts_)


def alerts(run: RunArg, logdir: LogdirOpt = Path(DEFAULT_LOGDIR), json_: JsonOpt = False) -> None:
    """List a run's health alerts, oldest first, active and resolved.

    Examples: [bold]tbhealth alerts mnist[/] · [bold]tbhealth alerts mnist --json[/]
    """
    rd = find_run(run, logdir)
    name = _display_name(rd, logdir)
    try:
        records = sorted(rd.read_alerts(), key=lambda a: a.get("time") or 0.0)
    except OSError as e:
        fail(f"run {name!r} has an unreadable alert record: {e}", code=ExitCode.FAILED)
    if json_:
        _echo_json([public_alert(a) for a in records])
        return
    from tbhealth_cli import render

    render.print_alerts(console, records, name)


def collect_runs(logdir: Path) -> list[dict]:
    """Summaries of every run under ``logdir``, newest first (start time, else last heartbeat).

    A run whose status cannot be read is listed as ``unknown`` with ``error`` saying why; one
    bad run never hides the others.
    """
    rows = []
    for path in list_run_dirs(logdir):
        status, error = RunDir(path).read_status_checked()
        row = run_summary(run_name(logdir, path), os.fspath(path), status)
        rows.append({**row, "error": error} if error else row)
    return newest_first(rows)


def runs(logdir: LogdirArg = Path(DEFAULT_LOGDIR), json_: JsonOpt = False) -> None:
    """List the runs under LOGDIR, newest first, with state, progress and latest validation metrics.

    Examples: [bold]tbhealth runs[/] · [bold]tbhealth runs experiments/ --json[/]
    """
    if not logdir.is_dir():
        fail(
            f"no folder {os.fspath(logdir)!r}",
            code=ExitCode.USAGE,
            hint="Pass the folder your runs are in (tbhealth runs PATH) or set TBHEALTH_LOGDIR.",
        )
    summaries = collect_runs(logdir)
    if json_:
        _echo_json(summaries)
        return
    if not summaries:
        console.print(
            f"No runs under {os.fspath(logdir)!r} yet. Start one: tbhealth train CONFIG --logdir {os.fspath(logdir)}",
            markup=False,
        )
        return
    from tbhealth_cli import render

    render.print_runs(console, summaries)
    for row in summaries:
        if row.get("error"):
            console.print(f"unreadable: {row['run']}: {row['error']}", markup=False, soft_wrap=True)


__all__ = ["status", "alerts", "runs", "collect_runs"]

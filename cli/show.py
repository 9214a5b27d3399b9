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
from tbhealth_cli import render
from tbhealth_cli.common import DEFAULT_LOGDIR, ExitCode, JsonOpt, LogdirOpt, RunArg, console, fail, find_run

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
    status = rd.read_status()
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
    render.print_status(console, st, name, rd.read_alerts())


def alerts(run: RunArg, logdir: LogdirOpt = Path(DEFAULT_LOGDIR), json_: JsonOpt = False) -> None:
    """List a run's health alerts, oldest first, active and resolved.

    Examples: [bold]tbhealth alerts mnist[/] · [bold]tbhealth alerts mnist --json[/]
    """
    rd = find_run(run, logdir)
    name = _display_name(rd, logdir)
    records = sorted(rd.read_alerts(), key=lambda a: a.get("time") if isinstance(a.get("time"), (int, float)) else 0.0)
    if json_:
        _echo_json([public_alert(a) for a in records])
        return
    render.print_alerts(console, records, name)


def collect_runs(logdir: Path) -> list[dict]:
    """Summaries of every run under ``logdir``, newest first (start time, else last heartbeat)."""
    return newest_first([
        run_summary(run_name(logdir, path), os.fspath(path), RunDir(path).read_status())
        for path in list_run_dirs(logdir)
    ])


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
    render.print_runs(console, summaries)


__all__ = ["status", "alerts", "runs", "collect_runs"]

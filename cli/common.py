"""What every command shares: the two consoles, option aliases and turning RUN into a run dir."""

from __future__ import annotations

import os
from enum import IntEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from tbhealth.run.names import RunNameError, list_run_dirs, resolve_run, run_name

from tbhealth.run.rundir import RunDir, STATE_SUBDIR

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DEFAULT_LOGDIR = "runs"


class ExitCode(IntEnum):
    """Every exit code the commands use; the README's command table lists them."""

    OK = 0
    FAILED = 1  # training failed, a control request was rejected, a run has no status yet
    USAGE = 2  # invalid config, arguments or run name
    NOT_LIVE = 3  # a control request to a run that is not live
    TIMEOUT = 4  # no acknowledgement in time
    ABORTED = 130  # a second Ctrl-C, or Ctrl-C during set-up (128 + SIGINT)
    TERMINATED = 143  # SIGTERM during set-up (128 + SIGTERM)

LogdirOpt = Annotated[
    Path,
    typer.Option("--logdir", envvar="TBHEALTH_LOGDIR", help="Folder that holds the runs.", show_default=True),
]
RunArg = Annotated[str, typer.Argument(help="A run directory, or a run name under --logdir.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def fail(message: str, code: int = ExitCode.FAILED, hint: str | None = None) -> NoReturn:
    """Print an error (and what to do next) on stderr and exit; never a traceback."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err_console.print(f"[dim]{escape(hint)}[/]", soft_wrap=True)
    raise typer.Exit(int(code))


def find_run(run: str, logdir: Path) -> RunDir:
    """RUN as given on the command line: an existing directory wins, else a name under logdir."""
    direct = Path(run)
    if os.path.isdir(direct / STATE_SUBDIR):  # os.path: a name too long for the system is just "no"
        return RunDir(direct.absolute() if direct.name in ("", "..") else direct)  # `status .` names the run
    try:
        path = resolve_run(logdir, run)
    except RunNameError as e:
        fail(str(e), code=ExitCode.USAGE)
    rd = RunDir(path)
    if not os.path.isdir(rd.state_dir):
        known = [run_name(logdir, p) for p in list_run_dirs(logdir)]
        hint = f"Runs under {logdir}: {', '.join(sorted(known)[:10])}" if known else (
            f"No runs under {os.fspath(logdir)!r}; pass --logdir or set TBHEALTH_LOGDIR."
        )
        fail(f"no run {run!r} (looked for {direct} and {path})", code=ExitCode.USAGE, hint=hint)
    return rd

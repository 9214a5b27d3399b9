"""What every command shares: the two consoles, option aliases and turning RUN into a run dir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from tbhealth import runstate

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DEFAULT_LOGDIR = "runs"

LogdirOpt = Annotated[
    Path,
    typer.Option("--logdir", envvar="TBHEALTH_LOGDIR", help="Folder that holds the runs.", show_default=True),
]
RunArg = Annotated[str, typer.Argument(help="A run directory, or a run name under --logdir.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def fail(message: str, code: int = 1, hint: str | None = None) -> NoReturn:
    """Print an error (and what to do next) on stderr and exit; never a traceback."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err_console.print(f"[dim]{escape(hint)}[/]", soft_wrap=True)
    raise typer.Exit(code)


def find_run(run: str, logdir: Path) -> runstate.RunDir:
    """RUN as given on the command line: an existing directory wins, else a name under logdir."""
    direct = Path(run)
    if (direct / runstate.STATE_SUBDIR).is_dir():
        return runstate.RunDir(direct)
    try:
        path = runstate.resolve_run(logdir, run)
    except runstate.RunNameError as e:
        fail(str(e), code=2)
    rd = runstate.RunDir(path)
    if not rd.state_dir.is_dir():
        known = [runstate.run_name(logdir, p) for p in runstate.list_run_dirs(logdir)]
        hint = f"Runs under {logdir}: {', '.join(sorted(known)[:10])}" if known else (
            f"No runs under {os.fspath(logdir)!r}; pass --logdir or set TBHEALTH_LOGDIR."
        )
        fail(f"no run {run!r} (looked for {direct} and {path})", code=2, hint=hint)
    return rd

"""``tbhealth board``: TensorBoard started with settings suited to watching live runs.

Why these settings: TensorBoard reloads every 5 s by default and keeps only 10–100 text records
per series; a live monitor wants 2 s reloads and every log line. It binds to localhost only,
because the Health tab can pause and stop runs: exposing it is the user's explicit choice
(``--host``), and ``--read-only`` then turns the controls off.

TensorBoard runs as a child process in its own session (so its own process group): a Ctrl-C
in the terminal reaches us, not it; we forward it exactly once and it shuts down cleanly. The
same child serves ``tbhealth board`` (in the foreground, we exit with its code) and ``tbhealth
train --board`` (beside the training, until Ctrl-C after it); both go through
:func:`start_board`, :func:`wait_forwarding_signals` and :func:`stop_board`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Annotated

import typer

from tbhealth_cli.common import DEFAULT_LOGDIR, ExitCode, console, err_console, fail

RELOAD_INTERVAL_S = 2
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def board_args(logdir: str | os.PathLike, port: int = 6006, host: str = "localhost", read_only: bool = False) -> list[str]:
    """The TensorBoard command line for ``tbhealth board``."""
    args = [
        sys.executable, "-m", "tensorboard.main",
        f"--logdir={os.fspath(logdir)}",
        f"--port={port}",
        f"--host={host}",
        f"--reload_interval={RELOAD_INTERVAL_S}",
        "--samples_per_plugin=text=0",  # keep every text record: the run log lives there
    ]
    if read_only:
        args.append("--tbhealth_read_only")
    return args


def board_url(port: int, host: str = "localhost") -> str:
    """Where a browser finds the Health tab."""
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/#tbhealth"


def start_board(logdir: str | os.PathLike, port: int = 6006, host: str = "localhost", read_only: bool = False,
                errors: IO | None = None) -> subprocess.Popen:
    """TensorBoard (:func:`board_args`) as a child in its own session: the terminal's Ctrl-C is
    ours to forward. ``errors``: a file for its output (in the background), else the terminal's."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": errors} if errors is not None else {}
    return subprocess.Popen(board_args(logdir, port, host, read_only), start_new_session=True, **quiet)


def stop_board(child: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate TensorBoard if it still runs; kill it if it does not exit within ``timeout``."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def wait_forwarding_signals(child: subprocess.Popen) -> int:
    """Wait for ``child``, forwarding SIGINT/SIGTERM to it once each; its exit code (128+N if killed)."""
    forwarded: set[int] = set()

    def forward(signum: int, _frame: object) -> None:
        if signum not in forwarded and child.poll() is None:
            forwarded.add(signum)
            child.send_signal(signum)

    # Handlers can only be set from the main thread (a test runner may call us from another).
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def board(
    logdir: Annotated[
        Path, typer.Argument(envvar="TBHEALTH_LOGDIR", help="Folder that holds the runs ($TBHEALTH_LOGDIR when set).")
    ] = Path(DEFAULT_LOGDIR),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 6006,
    host: Annotated[str, typer.Option(help="Address to bind; anything but localhost exposes the run controls.")] = "localhost",
    read_only: Annotated[bool, typer.Option("--read-only", help="Hide pause/stop/checkpoint in the Health tab.")] = False,
) -> None:
    """Open TensorBoard on LOGDIR with the Health tab, reloading every 2 s.

    Examples: [bold]tbhealth board[/] · [bold]tbhealth board experiments/ --port 6007 --read-only[/]
    """
    if logdir.exists() and not logdir.is_dir():
        fail(f"{os.fspath(logdir)!r} is a file, not a folder of runs", code=ExitCode.USAGE, hint="Pass the folder that holds your runs.")
    if host not in LOOPBACK_HOSTS and not read_only:
        err_console.print(
            f"[yellow]Warning:[/] binding to {host!r} lets anyone who can reach it pause and stop runs; "
            "add --read-only to turn the controls off."
        )
    if not logdir.exists():
        console.print(f"{os.fspath(logdir)!r} does not exist yet; runs appear as soon as they start there.")
    console.print(f"Health tab: [bold]{board_url(port, host)}[/]  (Ctrl-C to quit)")
    try:
        code = wait_forwarding_signals(start_board(logdir, port, host, read_only))
    except OSError as e:
        fail(f"could not start TensorBoard: {e}", code=ExitCode.FAILED, hint="Check that tensorboard is installed: pip install tensorboard")
    raise typer.Exit(code)


class BoardBeside:
    """TensorBoard beside a training: started before it, served after it until Ctrl-C.

    Its output goes to a temp file (a pipe nobody reads would fill up and block it during a long
    training); the file's tail is shown if it exits early.
    """

    def __init__(self, logdir: Path, port: int):
        logdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self._errors = tempfile.TemporaryFile(mode="w+", prefix="tbhealth-board-")
        self._child = start_board(logdir, port, errors=self._errors)
        console.print(f"TensorBoard with the Health tab: {board_url(port)}", markup=False, soft_wrap=True)

    def serve_until_interrupted(self) -> None:
        """After the training: keep serving until Ctrl-C (forwarded to TensorBoard), then stop."""
        try:
            if self._child.poll() is not None:
                self._errors.seek(0)
                err_console.print(f"TensorBoard exited early ({self._child.returncode}): "
                                  f"{self._errors.read()[-800:]}", markup=False)
                return
            console.print(f"Still serving {board_url(self.port)} — press Ctrl-C to quit.", markup=False, soft_wrap=True)
            wait_forwarding_signals(self._child)
        finally:
            self.stop()

    def stop(self) -> None:
        stop_board(self._child)
        self._errors.close()


__all__ = ["board", "board_args", "board_url", "start_board", "stop_board", "wait_forwarding_signals", "BoardBeside"]

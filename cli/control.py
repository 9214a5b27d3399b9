"""``tbhealth pause|resume|stop|checkpoint RUN``: send a request, wait for the trainer's answer.

Exit codes: 0 done, 1 rejected by the trainer, 3 the run is not live (finished, failed,
unresponsive, not started), 4 no acknowledgement within ``--timeout``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.markup import escape

from tbhealth.run.rundir import RunDir, RunNotLiveError
from tbhealth_cli.common import DEFAULT_LOGDIR, ExitCode, LogdirOpt, RunArg, console, fail, find_run


SUMMARIES = {
    "pause": "Pause a live run at its next step boundary (the heartbeat goes on).",
    "resume": "Resume a paused run exactly where it stopped.",
    "stop": "Stop a run gracefully: finish the step, write a checkpoint, exit 0.",
    "checkpoint": "Write a checkpoint of a live run now, without stopping it; prints the file.",
}

#: What to do next with a run that is not live (added to why it is not). A run's status names how
#: its own loop continues (``resume_hint``: a Lightning or custom-loop run is not resumed with
#: ``tbhealth train``); these are for runs whose status does not say.
NEXT_STEP = {
    "completed": "start a new run, or continue it with `tbhealth train CONFIG --name NAME --resume --set epochs=N`",
    "stopped": "continue it with `tbhealth train CONFIG --name NAME --resume`",
    "failed": "see `tbhealth status RUN` and the run's log",
}


def next_step(rd: RunDir, state: str) -> str | None:
    """What to do with a run that is not live, in the terms of the loop that ran it."""
    hint = (rd.read_status() or {}).get("resume_hint") if state in ("completed", "stopped") else None
    if not isinstance(hint, str) or not hint:
        return NEXT_STEP.get(state)
    return f"start a new run, or {hint}" if state == "completed" else hint


def send(command: str, rd: RunDir, *, wait: bool, timeout: float) -> int:
    """Send ``command`` to the run in ``rd``; print the outcome; return the exit code."""
    try:
        rid = rd.send_control(command, source="cli")
    except RunNotLiveError as e:
        why = "; ".join(filter(None, (e.why, next_step(rd, e.state))))
        fail(f"run {rd.path} is {e.state}: {command} not sent ({why}).", code=ExitCode.NOT_LIVE)
    except OSError as e:  # a folder where control.jsonl belongs, a full disk
        fail(f"cannot queue {command} for {rd.path}: {e}", code=ExitCode.FAILED)
    if not wait:
        console.print(f"{command} request {rid} sent to {rd.path}", markup=False, soft_wrap=True)
        return ExitCode.OK
    ack = rd.wait_for_ack(rid, timeout)
    if ack is None:
        fail(f"no acknowledgement of {command} ({rid}) within {timeout:g}s; the request stays queued.",
             code=ExitCode.TIMEOUT, hint=f"Check the run with `tbhealth status {rd.path}`.")
    if ack.get("status") != "done":
        fail(f"{command} rejected: {ack.get('detail', 'no reason given')}", code=ExitCode.FAILED)
    console.print(f"[green]{command}[/]: {escape(ack.get('detail', 'done'))}", soft_wrap=True)
    if command == "checkpoint" and ack.get("path"):
        console.print(ack["path"], markup=False, highlight=False, soft_wrap=True)
    return ExitCode.OK


def make_command(command: str) -> Callable[..., None]:
    def run_command(
        run: RunArg,
        logdir: LogdirOpt = Path(DEFAULT_LOGDIR),
        no_wait: Annotated[bool, typer.Option("--no-wait", help="Send the request and return at once.")] = False,
        timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the acknowledgement.")] = 30.0,
    ) -> None:
        raise typer.Exit(send(command, find_run(run, logdir), wait=not no_wait, timeout=timeout))

    run_command.__name__ = command
    run_command.__doc__ = f"{SUMMARIES[command]}\n\nExample: [bold]tbhealth {command} digits[/]"
    return run_command

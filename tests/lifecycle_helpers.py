"""Real trainings that are killed, interrupted, starved of disk and resumed (tests/test_lifecycle*.py).

Nothing here fakes a component: every run is ``tbhealth train`` in its own process, stopped the
way a user, a terminal or the kernel stops it, and read back through the run's own files.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

from tbhealth.run.rundir import RunDir
from tests.plugin_helpers import DIGITS, REPO, TRAIN_ENV, tbhealth_exe, wait_for

#: Tests import their own factories by path: the training processes need the repository on the path.
ENV = {**TRAIN_ENV, "PYTHONPATH": str(REPO)}
#: ~90 steps per epoch (batch 16), logging every 5: a kill lands mid-epoch, mid-checkpoint or mid-log.
KILLABLE = ("data.batch_size=16", "logging.every_steps=5", "checkpoint.every_epochs=1", "checkpoint.keep_last=2")


def train_cmd(logdir: Path, name: str, *overrides: str, resume: bool = False) -> list[str]:
    cmd = [tbhealth_exe(), "train", str(DIGITS), "--logdir", str(logdir), "--name", name, "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + (["--resume"] if resume else [])


def launch(logdir: Path, name: str, *overrides: str, resume: bool = False, out_dir: Path | None = None) -> subprocess.Popen:
    """``tbhealth train`` in the background; its output goes to a file in ``out_dir`` (default: logdir)."""
    out = open((out_dir or logdir) / f"{name}.{time.monotonic_ns()}.out", "w+")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen(train_cmd(logdir, name, *overrides, resume=resume), cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    proc.output_file = out
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for ``proc``; its exit code and everything it printed."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise
    proc.output_file.seek(0)
    text = proc.output_file.read()
    proc.output_file.close()
    return code, text


def output(proc: subprocess.Popen) -> str:
    """What ``proc`` printed so far."""
    return Path(proc.output_file.name).read_text()


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    finish(proc, 30)


@contextlib.contextmanager
def killed_if_left(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``proc`` for the block; killed at its end if the test left it running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill(proc)


def has_checkpoint(run: Path) -> bool:
    return (run / "checkpoints" / "last.pt").is_file()


def kill_at_random(proc: subprocess.Popen, run: Path, rng: random.Random, *, within_s: float = 1.5) -> None:
    """SIGKILL ``proc`` at a random moment after its run has a checkpoint to resume from."""
    wait_for(lambda: has_checkpoint(run) or proc.poll() is not None, 240, "a first checkpoint", interval=0.02)
    time.sleep(rng.uniform(0.0, within_s))
    kill(proc)


def status(run: Path) -> dict:
    return RunDir(run).read_status() or {}


def temp_files(folder: Path) -> list[str]:
    """Hidden temp files an atomic write left (``.<name>.<random>.tmp``)."""
    return sorted(p.name for p in folder.glob(".*.tmp")) if folder.is_dir() else []


# --------------------------------------------------------------------------- data factories


def slow_digits(marker: str, sleep_s: float = 120.0, **kwargs):
    """The built-in digits after ``sleep_s`` seconds, having created ``marker`` first: a set-up
    slow enough to be interrupted, and a file saying it has begun."""
    from tbhealth.training.data import digits

    Path(marker).touch()
    time.sleep(sleep_s)
    return digits(**kwargs)

"""Issue 11.6: a full disk or an unwritable state file, met by real trainings.

The run keeps training when only its log, alerts or status cannot be written (one line on stderr,
then retries), stops as ``failed`` with a true final status when the disk is full, and never
leaves half a log record. The full disk is a real one: a tmpfs of a few MB (needs root to mount;
skipped otherwise).
"""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest

from tbhealth.run.rundir import RunDir
from tbhealth.training import checkpoint as ckpt
from tests.lifecycle_helpers import KILLABLE, finish, killed_if_left, launch, output, status
from tests.plugin_helpers import control_and_wait, wait_for

pytestmark = pytest.mark.slow


def log_lines(rd: RunDir) -> list[str]:
    return rd.log_path.read_bytes().decode("utf-8").splitlines() if rd.log_path.is_file() else []


def test_state_files_turned_into_folders_do_not_stop_training(tmp_path):
    """``log.jsonl`` and ``status.json`` replaced by folders: training goes on (checkpoint requests
    are still answered at later steps), stderr says so once per file, and once they are files
    again the run's log and status resume; a stop then ends it as usual."""
    run, rd = tmp_path / "u", RunDir(tmp_path / "u")
    with killed_if_left(launch(tmp_path, "u", *KILLABLE, "epochs=100000")) as proc:
        wait_for(lambda: status(run).get("state") == "training" or proc.poll() is not None, 240, "training")
        for path in (rd.log_path, rd.status_path):
            path.unlink()
            path.mkdir()
        for what in ("log", "status"):  # the heartbeat writes the status once a second
            wait_for(lambda: f"could not write the run's {what}" in output(proc), 60, f"a failed {what} write")
        first = control_and_wait(tmp_path, "u", "checkpoint")["step"]
        wait_for(lambda: control_and_wait(tmp_path, "u", "checkpoint")["step"] > first + 20, 120,
                 "training to go on with its log and status unwritable")
        for path in (rd.log_path, rd.status_path):
            path.rmdir()
        wait_for(lambda: status(run).get("state") == "training", 30, "the status to be written again")
        wait_for(lambda: log_lines(rd), 60, "the log to be written again")
        control_and_wait(tmp_path, "u", "stop")
        code, out = finish(proc, 120)
    assert code == 0, out
    assert status(run)["state"] == "stopped"
    assert out.count("could not write the run's log") == 1 and out.count("could not write the run's status") == 1, out
    assert "the run's log is written again" in out and "Traceback" not in out


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MB file system (tmpfs), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler.bin"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                if len(block) == 1:
                    return filler
                block = block[: len(block) // 2]


def test_full_disk_stops_the_run_as_failed_and_it_resumes_once_freed(small_disk):
    logdir, run, rd = small_disk, small_disk / "f", RunDir(small_disk / "f")
    with killed_if_left(launch(logdir, "f", *KILLABLE, "epochs=100000", "checkpoint.every_epochs=0",
                               out_dir=logdir.parent)) as proc:
        wait_for(lambda: (rd.checkpoint_dir / "last.pt").is_file() or proc.poll() is not None, 240, "a checkpoint")
        filler = fill(logdir)
        code, out = finish(proc, 120)
    assert code == 1, out
    assert "disk is full" in out and "Traceback" not in out
    s = status(run)
    assert s["state"] == "failed" and "disk is full" in s["message"], s
    for line in log_lines(rd):  # no record cut short: every line is whole JSON
        json.loads(line)
    saved = ckpt.load(rd.checkpoint_dir / "last.pt")
    filler.unlink()
    code, out = finish(launch(logdir, "f", *KILLABLE, f"epochs={saved['epoch'] + 1}", resume=True, out_dir=logdir.parent))
    assert code == 0, out
    assert status(run)["state"] == "completed"

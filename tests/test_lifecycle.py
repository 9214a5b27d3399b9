"""Checkpoints and a run's life: kill -9 at random moments, resume, signals during set-up and after the end.

Every run is a real ``tbhealth train`` process; kills are SIGKILL from outside, as the kernel or
a scheduler sends them. Loops are bounded: a few kills of a few seconds each.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tbhealth.health.settings import HealthConfig
from tbhealth.run.files import read_records
from tbhealth.run.rundir import RunDir
from tbhealth.training import checkpoint as ckpt
from tests.lifecycle_helpers import KILLABLE, finish, kill, kill_at_random, launch, status, temp_files
from tests.plugin_helpers import train, wait_for
from tests.test_train import EPOCH_TAGS, scalars

def wait_training(proc, run: Path) -> None:
    """Until this process (not a killed predecessor) reports ``training``, or it has exited."""
    def live():
        s = status(run)
        return proc.poll() is not None or (s.get("pid") == proc.pid and s.get("state") == "training")

    wait_for(live, 240, f"process {proc.pid} training", interval=0.02)


# --------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.slow
def test_random_kills_and_resumes_show_every_epoch_and_step_exactly_once(tmp_path):
    """Issue 11.5: four SIGKILLs at random moments, each followed by ``--resume``; TensorBoard
    (EventAccumulator, as the Python loader reads) then holds each epoch and each logged step once."""
    rng, run, epochs = random.Random(5), tmp_path / "k", 6
    overrides = (*KILLABLE, f"epochs={epochs}")
    kill_at_random(launch(tmp_path, "k", *overrides), run, rng)
    for _ in range(3):
        proc = launch(tmp_path, "k", *overrides, resume=True)
        wait_training(proc, run)
        time.sleep(rng.uniform(0.0, 1.5))
        kill(proc)
    code, out = finish(launch(tmp_path, "k", *overrides, resume=True))
    assert code == 0, out
    s = status(run)
    assert s["state"] == "completed" and s["epoch"] == epochs
    acc = scalars(run)
    for tag in EPOCH_TAGS:
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, epochs + 1)), tag
    steps = [e.step for e in acc.Scalars("step/loss")]
    dense = HealthConfig().dense_steps  # the run's first steps each log too
    expected = sorted(set(range(1, dense + 1)) | set(range(5, s["global_step"] + 1, 5)))
    assert steps == expected, "every logged step exactly once"


@pytest.mark.slow
def test_kill_9_amid_checkpoint_requests_leaves_every_acknowledged_file_loadable(tmp_path):
    """Issue 14.1: a tight loop of ``checkpoint`` requests, SIGKILL at a random moment, three
    times: every checkpoint acknowledged as written is on disk and loads, every ``.pt`` there
    loads, and the run resumes to the end with no temp file left behind."""
    rng, run = random.Random(3), tmp_path / "c"
    overrides = (*KILLABLE, "epochs=4")
    rd = RunDir(run)
    for round_ in range(3):
        proc = launch(tmp_path, "c", *overrides, resume=round_ > 0)
        wait_training(proc, run)
        done_before, until = len(done_acks(rd)), None  # the random window opens at this round's first ack
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < (until or deadline):
            rd.request_control("checkpoint", source="test")
            time.sleep(0.003)
            if until is None and len(done_acks(rd)) > done_before:
                until = time.monotonic() + rng.uniform(0.0, 1.5)
        kill(proc)
        acks, _ = read_records(rd.acks_path)
        written = {a["checkpoint"] for a in acks if a.get("status") == "done" and a.get("checkpoint")}
        assert written, "some checkpoint requests were acknowledged"
        assert written <= {p.name for p in rd.checkpoint_dir.glob("*.pt")}, "acknowledged means on disk"
        for path in rd.checkpoint_dir.glob("*.pt"):
            ckpt.load(path)  # raises on a truncated or foreign file
    code, out = finish(launch(tmp_path, "c", *overrides, resume=True))
    assert code == 0, out
    assert status(run)["state"] == "completed"
    assert temp_files(rd.checkpoint_dir) == [] and temp_files(rd.state_dir) == []


def done_acks(rd: RunDir) -> list[dict]:
    return [a for a in read_records(rd.acks_path)[0] if a.get("status") == "done"]


def test_best_epoch_and_last_of_one_state_are_one_file(tmp_path):
    """Issue 14.1: ``best.pt``, ``epoch-N.pt`` and ``last.pt`` of the same step are serialised
    once (the others are links), and hold the same training state."""
    train(tmp_path, "one", "epochs=2", "checkpoint.every_epochs=1", "checkpoint.keep_last=1",
          "model.kwargs.dropout=0.0", "health.enabled=false")
    ck = tmp_path / "one" / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["best.pt", "epoch-0002.pt", "last.pt"]
    last = ckpt.load(ck / "last.pt")
    assert last["epoch"] == 2 and last["global_step"] == status(tmp_path / "one")["global_step"]
    assert os.path.samefile(ck / "last.pt", ck / "epoch-0002.pt")
    if ckpt.load(ck / "best.pt")["epoch"] == 2:  # the best epoch is the last one here (no dropout, 2 epochs)
        assert os.path.samefile(ck / "last.pt", ck / "best.pt")


def test_resume_removes_stale_temp_files(tmp_path):
    """Issue 11.9: a kill -9 during a write leaves ``.<name>.<random>.tmp``; the next start cleans it."""
    train(tmp_path, "t", "epochs=1")
    rd = RunDir(tmp_path / "t")
    stale = [rd.checkpoint_dir / ".last.pt.0123abcd.tmp", rd.state_dir / ".status.json.89abcdef.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 4096)
    keep = rd.checkpoint_dir / "notes.tmp"  # not an atomic write's temp file: not ours to remove
    keep.write_text("mine")
    code, out = finish(launch(tmp_path, "t", "epochs=2", resume=True))
    assert code == 0, out
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


# --------------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_setup_leaves_no_run_behind(tmp_path, sig, code):
    """Issue 11.9: Ctrl-C or SIGTERM while the data is being built: no empty run folder, the
    signal's exit code (128 + n), and no traceback."""
    marker = tmp_path / "building"
    proc = launch(tmp_path, "s", "data.source=tests.lifecycle_helpers:slow_digits", f"data.kwargs={{marker: {marker}}}")
    wait_for(lambda: marker.exists() or proc.poll() is not None, 240, "the data factory to start", interval=0.02)
    proc.send_signal(sig)
    got, out = finish(proc, 60)
    assert got == code, out
    assert "Traceback" not in out
    assert not (tmp_path / "s").exists(), "the run folder it had created is gone"


@pytest.mark.slow
def test_sigterm_during_resume_setup_keeps_the_final_state(tmp_path):
    """A resume interrupted before training leaves the run as it was: its final state and checkpoints."""
    train(tmp_path, "r", "epochs=1")
    run = tmp_path / "r"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    marker = tmp_path / "building"
    proc = launch(tmp_path, "r", "epochs=2", "data.source=tests.lifecycle_helpers:slow_digits",
                  f"data.kwargs={{marker: {marker}}}", resume=True)
    wait_for(lambda: marker.exists() or proc.poll() is not None, 240, "the data factory to start", interval=0.02)
    proc.send_signal(signal.SIGTERM)
    got, out = finish(proc, 60)
    assert got == 143, out
    assert status(run)["state"] == "completed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_sigterm_right_after_completion_exits_zero(tmp_path):
    """Issue 11.9: a SIGTERM once the run has completed (a scheduler cleaning up) is not a failure."""
    run = tmp_path / "d"
    proc = launch(tmp_path, "d", "epochs=1")
    wait_for(lambda: status(run).get("state") == "completed" or proc.poll() is not None, 240, "completion",
             interval=0.005)
    sent = 0
    while proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.002)
    code, out = finish(proc, 60)
    assert sent > 0, "the test got no SIGTERM in before the exit"
    assert code == 0, out

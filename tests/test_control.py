"""Live control of real trainings in subprocesses: pause, resume, checkpoint, stop, signals, crashes.

Every test starts ``tbhealth train`` as a separate process and talks to it only the way a user
does: the ``tbhealth`` control commands and the run-state files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tbhealth.run.files import read_records

from tbhealth.run.rundir import RunDir

from tbhealth.run.states import STALE_AFTER_S
from tests.plugin_helpers import REPO, start_training, tbhealth_exe, wait_for, wait_for_state

pytestmark = pytest.mark.slow

LIVE = ("epochs=100000", "logging.every_steps=5")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([tbhealth_exe(), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def status(run: Path) -> dict:
    return RunDir(run).read_status()


def step_of(run: Path) -> int:
    return status(run)["global_step"]


@pytest.fixture
def live(tmp_path):
    """A run that trains until told otherwise; killed at the end whatever happened."""
    procs = []

    def start(name="live", *extra):
        proc = start_training(tmp_path, name, *LIVE, *extra)
        procs.append(proc)
        wait_for_state(tmp_path, name, ("training",), timeout=90)
        wait_for(lambda: step_of(tmp_path / name) > 0, 60, "first steps")
        return proc, tmp_path / name

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_pause_holds_the_step_and_resume_continues(live):
    proc, run = live()
    r = cli("pause", str(run))
    assert r.returncode == 0, r.stderr
    assert "paused at epoch" in r.stdout
    s = wait_for_state(run.parent, run.name, ("paused",), timeout=10)
    held = s["global_step"]
    for _ in range(2):  # two more heartbeats: the heartbeat goes on while paused, the steps do not
        s2 = wait_for(lambda: (st := status(run))["updated_at"] > s["updated_at"] and st, 20, "a heartbeat")
        assert s2["state"] == "paused" and s2["global_step"] == held
        s = s2
    assert s2["interventions"]["pauses"] == 1
    r = cli("resume", str(run))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: step_of(run) > held, 20, "steps after resume")
    assert cli("resume", str(run)).returncode == 1  # not paused: rejected


def test_checkpoint_names_a_loadable_file(live):
    proc, run = live()
    r = cli("checkpoint", str(run))
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.parent == run / "checkpoints" and path.is_file()
    state = torch.load(path, weights_only=False)
    assert {"model", "optimizer", "global_step", "rng", "config"} <= set(state)
    assert status(run)["state"] == "training"


def test_stop_exits_zero_with_checkpoint(live):
    proc, run = live()
    r = cli("stop", str(run))
    assert r.returncode == 0, r.stderr
    assert proc.wait(60) == 0
    s = status(run)
    assert s["state"] == "stopped"
    assert (run / "checkpoints" / "last.pt").is_file()
    ack = next(iter(RunDir(run).read_acks().values()))
    assert ack["checkpoint"] == "last.pt"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_stops_gracefully_with_checkpoint(live, sig):
    """``kill`` and a closed terminal (SIGHUP, not under nohup) end the run as a stop would."""
    proc, run = live()
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    s = status(run)
    assert s["state"] == "stopped" and s["message"].startswith(f"received {sig.name}")
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ck["global_step"] == status(run)["global_step"]


def test_concurrent_requests_each_acknowledged_once_in_order(live):
    """20 requests from 4 processes: all applied in file order, each acknowledged exactly once."""
    proc, run = live()
    commands = ["checkpoint", "pause", "resume", "checkpoint", "pause"]

    def sender(_):
        return [cli("checkpoint" if i % 2 else c, str(run), "--no-wait").returncode for i, c in enumerate(commands)]

    with ThreadPoolExecutor(4) as pool:
        codes = [c for batch in pool.map(sender, range(4)) for c in batch]
    assert codes == [0] * 20
    rd = RunDir(run)
    requests, _ = rd.read_control(0)
    assert len(requests) == 20
    # a last request: requests are applied in file order, so once it is answered every earlier
    # one has been, and a duplicate acknowledgement would already be in the file
    sentinel = rd.request_control("checkpoint", source="test")
    assert rd.wait_for_ack(sentinel, 30) is not None
    acks, _ = read_records(rd.acks_path)
    ids = [a["id"] for a in acks][:-1]
    assert sorted(ids) == sorted(r.id for r in requests) and len(set(ids)) == 20
    assert ids == [r.id for r in requests], "acknowledged in the order the requests were written"
    # the pause/resume outcomes follow the file order exactly
    paused = False
    for req, ack in zip(requests, acks):
        if req.command == "pause":
            assert ack["status"] == ("rejected" if paused else "done")
            paused = True
        elif req.command == "resume":
            assert ack["status"] == ("done" if paused else "rejected")
            paused = False
        else:
            assert ack["status"] == "done"


def test_malformed_requests_are_rejected_and_training_goes_on(live):
    proc, run = live()
    rd = RunDir(run)
    with open(rd.control_path, "a") as f:
        f.write("this is not json\n")
        f.write(json.dumps({"id": "x1", "command": "explode"}) + "\n")
        f.write(json.dumps({"command": "pause"}) + "\n")
    wait_for(lambda: len(rd.read_acks()) >= 3, 20, "three rejections")
    assert {a["status"] for a in rd.read_acks().values()} == {"rejected"}
    assert "unknown command" in rd.read_acks()["x1"]["detail"]
    before = step_of(run)
    wait_for(lambda: step_of(run) > before, 20, "training continues")
    assert proc.poll() is None


def test_kill_9_reads_as_unresponsive(live):
    proc, run = live()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    s = wait_for(lambda: (st := status(run)) and st["state"] == "unresponsive" and st,
                 STALE_AFTER_S + 5, "unresponsive")
    assert s["reported_state"] == "training"
    r = cli("status", str(run), "--json")
    assert json.loads(r.stdout)["state"] == "unresponsive"
    r = cli("pause", str(run))
    assert r.returncode == 3 and "unresponsive" in r.stderr


def test_finished_run_refuses_control(tmp_path):
    from tests.plugin_helpers import train

    train(tmp_path, "done", "epochs=1")
    run = tmp_path / "done"
    assert status(run)["state"] == "completed"
    for command in ("pause", "resume", "stop", "checkpoint"):
        r = cli(command, "done", "--logdir", str(tmp_path))
        assert r.returncode == 3, (command, r.stdout, r.stderr)
        assert "completed" in r.stderr and "Traceback" not in r.stderr
    assert not RunDir(run).control_path.exists(), "nothing was queued"


def test_model_that_raises_fails_with_traceback_in_log(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [tbhealth_exe(), "train", str(REPO / "examples" / "digits.yaml"), "--logdir", str(tmp_path),
           "--name", "boom", "--set", "model.source=tests.factories:model_that_raises", "--set", "model.kwargs={}",
           "--set", "epochs=3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "training failed" in r.stderr and "RuntimeError" in r.stderr
    assert "Traceback" not in r.stderr, "the terminal gets a message; the log gets the traceback"
    rd = RunDir(tmp_path / "boom")
    assert rd.read_status()["state"] == "failed"
    records, _ = rd.read_log()
    errors = [r["message"] for r in records if r["level"] == "ERROR"]
    assert any("Traceback" in m and "model_that_raises" in m or "deliberate failure" in m for m in errors)

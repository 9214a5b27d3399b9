"""``status``, ``alerts`` and ``runs --json`` of real trainings, checked against tbhealth.run.schema.

Three real ``tbhealth train`` processes per session: ``fin`` (4 short epochs, its status sampled
while it trains, for the ETA), ``div`` (a learning rate that diverges, stopped by its health
rule) and ``live`` (trains until the last test stops it with ``tbhealth stop``). The tests read
them only as a user would: the ``tbhealth`` commands and ``RunDir``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tbhealth.run.files import read_json

from tbhealth.run.rundir import RunDir, STATE_SUBDIR
from tbhealth.monitor.progress import Progress
from tbhealth.run.status import build_status
from tbhealth.run.schema import validate_alert, validate_run_summary, validate_status
from tests.plugin_helpers import REPO, end_live, start_live, start_training, tbhealth_exe, wait_for, wait_for_state

slow = pytest.mark.slow

FIN_EPOCHS = 10
FIN_STEPS = 180  # per epoch: 1437 training samples / batch 8
FIN = (f"epochs={FIN_EPOCHS}", "data.batch_size=8")  # 180 steps per epoch: heartbeats within epochs, ~8 s
DIV = ("epochs=3", "optimizer.name=SGD", "optimizer.lr=50")  # NaN within ~10 steps; divergence action: stop


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([tbhealth_exe(), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def cli_json(*args: str):
    r = cli(*args, "--json")
    assert r.returncode == 0, f"tbhealth {' '.join(args)} --json exited {r.returncode}:\n{r.stderr}"
    return json.loads(r.stdout)


def sample(rd: RunDir, seconds: float | None = None, until=None, every: float = 0.02) -> list[dict]:
    """Each distinct status write seen while polling every ``every`` s (the files a reader gets)."""
    seen: list[dict] = []
    deadline = time.monotonic() + (seconds if seconds is not None else 300)
    while time.monotonic() < deadline and not (until and until()):
        s = rd.read_status()
        if s and (not seen or s["updated_at"] != seen[-1]["updated_at"]):
            seen.append(s)
        time.sleep(every)
    return seen


def heartbeats(rd: RunDir, n: int, after: float = 0.0, timeout: float = 30) -> list[dict]:
    """The next ``n`` distinct status writes (later than ``after``) as a reader sees them."""
    seen: list[dict] = []

    def more():
        s = rd.read_status()
        if s and s["updated_at"] > max(after, seen[-1]["updated_at"] if seen else 0.0):
            seen.append(s)
        return len(seen) >= n

    wait_for(more, timeout, f"{n} heartbeats", interval=0.02)
    return seen


def log_levels(rd: RunDir) -> tuple[int, int]:
    records, _ = rd.read_log()
    return sum(r["level"] == "WARNING" for r in records), sum(r["level"] == "ERROR" for r in records)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("status-json")


@pytest.fixture(scope="module")
def finished(logdir) -> list[dict]:
    """Train ``div`` and ``fin`` side by side to the end; returns ``fin``'s statuses as it trained."""
    div = start_training(logdir, "div", *DIV, output=logdir.parent / "div.out")
    fin = start_training(logdir, "fin", *FIN, output=logdir.parent / "fin.out")
    try:
        samples = sample(RunDir(logdir / "fin"), until=lambda: fin.poll() is not None)
        for name, proc in (("fin", fin), ("div", div)):
            assert proc.wait(240) == 0, f"{name} exited {proc.returncode}:\n{(logdir.parent / f'{name}.out').read_text()}"
    finally:
        for proc in (div, fin):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return samples


@pytest.fixture(scope="module")
def live(logdir):
    """A run that trains (epochs=100000) until ``test_stop_then_status`` stops it."""
    proc = start_live(logdir, "live", "logging.every_steps=5")
    rd = RunDir(logdir / "live")
    try:
        wait_for(lambda: rd.read_status()["epochs_done"] >= 1, 120, "live run's first epoch")
    except BaseException:
        end_live(proc, logdir, "live")
        raise
    yield proc, rd
    end_live(proc, logdir, "live")


# --------------------------------------------------------------------------- ETA (no training)


def test_eta_between_two_epochs_counts_the_next_epoch_whole():
    """After epoch 2 of 4 ends and before epoch 3 starts, two whole epochs remain."""
    p = Progress(run="r", total_epochs=4, state="training", epoch=2, epochs_done=2, batch=10,
                 batches_per_epoch=10, epoch_durations=[5.0, 5.0])
    s = build_status(p, system=None, alerts_active=0, health_score=100)
    assert s["eta_s"] == 10.0
    p.epoch, p.batch = 3, 5  # halfway through epoch 3
    assert build_status(p, system=None, alerts_active=0, health_score=100)["eta_s"] == 7.5
    p.state, p.epoch, p.epochs_done, p.batch = "completed", 4, 4, 10
    assert build_status(p, system=None, alerts_active=0, health_score=100)["eta_s"] == 0.0


# --------------------------------------------------------------------------- finished runs


@slow
def test_status_json_of_a_completed_run(logdir, finished):
    s = validate_status(cli_json("status", "fin", "--logdir", str(logdir)))
    assert s["run"] == "fin" and s["state"] == "completed" and "v" not in s
    assert s["eta_s"] == 0
    assert (s["epoch"], s["epochs_done"], s["total_epochs"]) == (FIN_EPOCHS, FIN_EPOCHS, FIN_EPOCHS)
    assert s["batch"] == s["batches_per_epoch"] == FIN_STEPS and s["global_step"] == FIN_STEPS * FIN_EPOCHS
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert isinstance(s["metrics"][key]["value"], float), key
        assert isinstance(s["metrics"][key]["delta"], float), key  # several epochs: a change to show
    assert s["metrics"]["val_acc"]["value"] > 0.8, "digits learns in a few epochs"
    assert s["elapsed_s"] > 0 and s["interventions"] == {"pauses": 0, "resumes": 0, "stops": 0, "checkpoints": 0}
    # the file the trainer wrote has the same shape as the command's output
    validate_status(read_json(logdir / "fin" / STATE_SUBDIR / "status.json"))


@slow
def test_eta_falls_while_training_and_is_zero_at_completion(finished):
    training = [s for s in finished if s["state"] == "training" and s["eta_s"] is not None]
    assert len(training) >= 5, f"only {len(training)} heartbeats with an ETA were seen"
    for s in finished:
        validate_status(s)
        if s["state"] == "training" and s["global_step"] > 0:
            assert s["eta_s"] is not None, f"no ETA at step {s['global_step']}"
    assert training[-1]["eta_s"] < training[0]["eta_s"]
    # While the set of finished epochs stays the same, the pace the ETA uses stays the same, so
    # the ETA can only fall as batches finish: between two epochs too (a whole epoch still to go).
    # (A sample taken while the epoch's validation runs is left out: its epoch may just have
    # been counted in the pace but not yet in epochs_done.)
    groups: dict[int, list[dict]] = {}
    for s in training:
        if not (s["epoch"] > s["epochs_done"] and s["batch"] == s["batches_per_epoch"]):
            groups.setdefault(s["epochs_done"], []).append(s)
    for done, group in groups.items():
        if done == 0:
            continue  # in the first epoch the pace is the epoch's own so far, which may change
        etas = [(s["epoch"], s["batch"], s["eta_s"]) for s in group]
        for (e1, b1, a), (e2, b2, b) in zip(etas, etas[1:]):
            assert b <= a + 0.1, f"ETA rose with {done} epochs done: {etas}"
    final = finished[-1]
    assert final["state"] == "completed" and final["eta_s"] == 0


@slow
def test_alerts_json_of_a_diverging_run(logdir, finished):
    alerts = cli_json("alerts", "div", "--logdir", str(logdir))
    assert isinstance(alerts, list) and alerts
    for a in alerts:
        validate_alert(a)
        assert list(a)[:11] == ["id", "rule", "severity", "message", "epoch", "step", "time", "layer", "value",
                                "threshold", "resolved"]
    assert [a["time"] for a in alerts] == sorted(a["time"] for a in alerts), "oldest first"
    div = [a for a in alerts if a["rule"] == "divergence"]
    assert len(div) == 1 and div[0]["severity"] == "critical" and div[0]["resolved"] is False
    assert div[0]["epoch"] == 1 and div[0]["step"] >= 1 and div[0]["layer"] is None
    assert len({a["id"] for a in alerts}) == len(alerts)

    s = validate_status(cli_json("status", "div", "--logdir", str(logdir)))
    assert s["state"] == "stopped" and s["eta_s"] is None
    assert s["alerts_active"] == sum(not a["resolved"] for a in alerts) >= 1
    assert s["health_score"] < 100
    warnings, errors = log_levels(RunDir(logdir / "div"))
    assert errors >= 1, "a divergence is logged as an error"
    assert s["log_counts"] == {"warnings": warnings, "errors": errors}


# --------------------------------------------------------------------------- a live run


@slow
def test_status_json_of_a_live_run(logdir, live):
    proc, rd = live
    s = validate_status(cli_json("status", "live", "--logdir", str(logdir)))
    assert s["run"] == "live" and s["state"] == s["reported_state"] == "training"
    assert s["total_epochs"] == 100000 and s["epoch"] >= 1 and s["batches_per_epoch"] == 23
    assert isinstance(s["eta_s"], float) and s["eta_s"] > 0
    assert s["metrics"]["val_acc"]["value"] > 0 and s["system"] is not None
    assert s["pid"] == proc.pid and s["run_dir"] == str(rd.path) and s["host"]
    assert s["device"] == "cpu" or s["device"].startswith("cuda")
    wait_for(lambda: rd.read_status()["last_checkpoint"] == "last.pt", 30, "the first epoch's checkpoint")
    heartbeats(rd, 1, after=s["updated_at"])
    later = validate_status(cli_json("status", str(rd.path)))  # RUN as a path works the same
    assert later["updated_at"] > s["updated_at"] and later["elapsed_s"] > s["elapsed_s"]
    assert later["global_step"] >= s["global_step"]


@slow
def test_heartbeat_while_training_and_paused_and_elapsed_excludes_the_pause(logdir, live):
    proc, rd = live
    training = heartbeats(rd, 3)
    assert all(s["state"] == "training" for s in training)
    wait_for(lambda: rd.read_status()["global_step"] > training[0]["global_step"], 30, "steps")

    r = cli("pause", "live", "--logdir", str(logdir))
    assert r.returncode == 0, r.stderr
    acked = max(a["time"] for a in rd.read_acks().values())
    paused = heartbeats(rd, 3, after=acked)  # the status is rewritten while paused
    first, last = paused[0], paused[-1]
    assert all(s["state"] == "paused" for s in paused)
    assert last["global_step"] == first["global_step"], "no step while paused"
    assert last["elapsed_s"] == pytest.approx(first["elapsed_s"], abs=0.002), "elapsed must not count paused time"
    assert last["interventions"]["pauses"] == 1
    validate_status(cli_json("status", "live", "--logdir", str(logdir)))

    r = cli("resume", "live", "--logdir", str(logdir))
    assert r.returncode == 0, r.stderr
    resumed = wait_for(lambda: (s := rd.read_status())["state"] == "training" and s, 10, "state training")
    after = wait_for(lambda: (s := rd.read_status())["elapsed_s"] > resumed["elapsed_s"]
                     and s["global_step"] > last["global_step"] and s, 30, "elapsed and steps to count again")
    assert after["interventions"]["resumes"] == 1


@slow
def test_warnings_are_counted(logdir, live):
    proc, rd = live
    before = rd.read_status()["log_counts"]["warnings"]
    r = cli("resume", "live", "--logdir", str(logdir))  # not paused: rejected, logged as a warning
    assert r.returncode == 1 and "not paused" in r.stderr

    def counted():
        s = rd.read_status()
        warnings, errors = log_levels(rd)
        return s["log_counts"] == {"warnings": warnings, "errors": errors} and warnings > before and s

    wait_for(counted, 10, "log_counts to match the log's WARNING/ERROR records")
    records, _ = rd.read_log()
    assert any(r["level"] == "WARNING" and "not paused" in r["message"] for r in records)
    # (health alerts of the long run, e.g. overfitting, may add warnings of their own)


@slow
def test_runs_json_lists_live_and_finished_runs(logdir, live, finished):
    rows = cli_json("runs", str(logdir))
    for row in rows:
        validate_run_summary(row)
    by_name = {row["run"]: row for row in rows}
    assert set(by_name) == {"fin", "div", "live"}
    assert by_name["fin"]["state"] == "completed" and by_name["fin"]["progress"] == 1.0
    assert by_name["fin"]["eta_s"] == 0 and by_name["fin"]["val_acc"] > 0.5
    assert by_name["div"]["state"] == "stopped" and by_name["div"]["alerts_active"] >= 1
    live_row = by_name["live"]
    assert live_row["state"] == "training" and 0 < live_row["progress"] < 0.01
    assert live_row["path"] == str(logdir / "live") and live_row["eta_s"] > 0
    started = [row["started_at"] for row in rows]
    assert started == sorted(started, reverse=True), "newest first"


@slow  # keep last: it ends the module's live run
def test_stop_then_status(logdir, live):
    proc, rd = live
    r = cli("stop", "live", "--logdir", str(logdir))
    assert r.returncode == 0, r.stderr
    assert proc.wait(60) == 0
    s = validate_status(cli_json("status", "live", "--logdir", str(logdir)))
    assert s["state"] == "stopped" and s["eta_s"] is None
    assert s["interventions"]["stops"] == 1
    wait_for_state(logdir, "live", ("stopped",), timeout=1)
    (row,) = [row for row in cli_json("runs", str(logdir)) if row["run"] == "live"]
    assert validate_run_summary(row)["state"] == "stopped"

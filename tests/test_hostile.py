"""Issue #11, the run's own side: what a hostile neighbour, a careless tool or a shell does to the
files of a live or resumed run, with the real trainer, CLI and plugin.

* a malformed control or ack line is rejected with an acknowledgement; training goes on and a
  ``--resume`` starts (point 1);
* a checkpoint swapped for a symlink while it is downloaded is never served (point 2);
* state files and folders replaced by symlinks are never written through (point 3);
* a truncated or replaced ``control.jsonl``/``acks.jsonl`` loses no request (point 7);
* every file a run creates follows the umask (point 10).
Readers' side: tests/test_hostile_reads.py; bad input: tests/test_hostile_input.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tbhealth.monitor.control import ControlChannel
from tbhealth.run.files import append_record, read_records
from tbhealth.run.rundir import RunDir
from tests.plugin_helpers import (
    PREFIX, REPO, TRAIN_ENV, control_and_wait, end_live, finished_runs, make_app, start_live, tbhealth_exe,
    wait_for, wait_for_state,
)

#: A training of about a second: 8 steps per epoch.
TINY = """\
name: tiny
seed: 0
epochs: 1
device: cpu
data: {source: synthetic_classification, kwargs: {n_samples: 320, n_features: 8, n_classes: 4}, batch_size: 32}
model: {source: mlp, kwargs: {hidden: [16]}}
optimizer: {name: Adam, lr: 0.01}
scheduler: {name: null}
logging: {every_steps: 2}
checkpoint: {every_epochs: 1, keep_last: 2}
"""

#: Control lines that are not valid requests: each must be rejected, none may stop the run.
BAD_CONTROL_LINES = {
    "time-text": '{"v":1,"id":"t1","command":"pause","time":"soon"}',
    "time-list": '{"v":1,"id":"t2","command":"pause","time":[1]}',
    "time-object": '{"v":1,"id":"t3","command":"pause","time":{}}',
    "time-huge": '{"v":1,"id":"t4","command":"pause","time":1' + "0" * 400 + "}",
    "time-nan": '{"v":1,"id":"t5","command":"pause","time":NaN}',
    "id-list": '{"v":1,"id":["x"],"command":"pause"}',
    "id-long": '{"v":1,"id":"' + "a" * 100 + '","command":"pause"}',
    "command-list": '{"v":1,"id":"c1","command":["pause"]}',
    "array": "[1]",
    "not-json": "pause now please",
    "deep": '{"id":"d1","command":"pause","x":' + "[" * 50_000 + "]" * 50_000 + "}",
}
BAD_ACK_LINES = ['{"v":1,"id":["x"],"status":"done"}', '{"v":1,"id":{"a":1},"status":"done"}', "[]", "garbage"]


def plant(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


def tbhealth(*args: str, cwd: Path = REPO, timeout: float = 240, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tbhealth_exe(), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**TRAIN_ENV, "COLUMNS": "300", "NO_COLOR": "1"},
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def rejected(rd: RunDir) -> dict[str, str]:
    records, _ = read_records(rd.acks_path)
    return {r["id"]: r["detail"] for r in records if r.get("status") == "rejected" and isinstance(r.get("id"), str)}


# --------------------------------------------------------------------------- point 1: parsing, no trainer


@pytest.mark.parametrize("kind", list(BAD_CONTROL_LINES))
def test_a_bad_control_line_becomes_a_rejection_not_an_exception(tmp_path, kind):
    rd = RunDir(tmp_path)
    plant(rd.control_path, [BAD_CONTROL_LINES[kind]])
    rid = rd.request_control("pause")
    requests, _ = rd.read_control(0)
    assert [r.error is not None for r in requests] == [True, False], requests
    assert requests[1].id == rid
    channel = ControlChannel(RunDir(tmp_path))
    assert channel.reject_stale() == 2
    assert len(rejected(rd)) == 2


def test_a_bad_line_keeps_its_id_so_a_resume_does_not_reject_it_twice(tmp_path):
    rd = RunDir(tmp_path)
    plant(rd.control_path, list(BAD_CONTROL_LINES.values()))
    assert ControlChannel(rd).reject_stale() == len(BAD_CONTROL_LINES)
    assert ControlChannel(rd).reject_stale() == 0  # the next incarnation finds them answered


def test_bad_ack_lines_are_skipped(tmp_path):
    rd = RunDir(tmp_path)
    plant(rd.acks_path, BAD_ACK_LINES)
    rd.acknowledge("good", "done", "ok")
    assert list(rd.read_acks()) == ["good"]
    assert rd.wait_for_ack("good", timeout=5)["detail"] == "ok"


# --------------------------------------------------------------------------- point 7: truncation, replacement


def test_the_channel_keeps_requests_across_truncation_and_replacement(tmp_path):
    rd = RunDir(tmp_path)
    channel = ControlChannel(rd)
    first = [rd.request_control("pause") for _ in range(3)]
    assert [r.id for r in channel.poll(force=True)] == first
    with open(rd.control_path, "w"):  # `: > control.jsonl`
        pass
    after_truncation = [rd.request_control("resume") for _ in range(2)]
    assert [r.id for r in channel.poll(force=True)] == after_truncation
    with open(rd.control_path, "w"):  # truncated, then rewritten past the old offset before a poll
        pass
    rewritten = [rd.request_control(c) for c in ("pause", "resume", "checkpoint", "stop")]
    assert [r.id for r in channel.poll(force=True)] == rewritten
    replacement = tmp_path / "new.jsonl"
    append_record(replacement, {"id": first[0], "command": "pause"})  # already handled: not again
    append_record(replacement, {"id": "fresh1", "command": "checkpoint"})
    os.replace(replacement, rd.control_path)
    assert [r.id for r in channel.poll(force=True)] == ["fresh1"]
    assert channel.poll(force=True) == []


def test_a_repeated_request_id_is_handed_over_once(tmp_path):
    rd = RunDir(tmp_path)
    channel = ControlChannel(rd)
    for _ in range(3):
        append_record(rd.control_path, {"id": "same", "command": "pause"})
    assert [r.id for r in channel.poll(force=True)] == ["same"]


def test_a_follower_reads_on_after_truncation(tmp_path):
    from tbhealth.run.tail import Follower

    path = tmp_path / "acks.jsonl"
    follower = Follower(path)
    for i in range(5):
        append_record(path, {"id": f"old{i}"})
    assert len(follower.read()) == 5 and not follower.changed()
    with open(path, "w"):
        pass
    append_record(path, {"id": "new"})
    assert follower.changed()
    assert [r["id"] for _, r in follower.read()] == ["new"]


def test_wait_for_ack_survives_acks_truncated_while_it_waits(tmp_path):
    """The truncation happens once the waiter has read the file (seen in its frame's locals:
    its read offset is past 0), so the old reader's offset is provably stale."""
    rd = RunDir(tmp_path)
    for i in range(20):
        rd.acknowledge(f"old{i}", "done", "earlier")
    main = threading.get_ident()

    def waiter_has_read() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None and frame.f_code.co_name != "wait_for_ack":
            frame = frame.f_back
        if frame is None:
            return False
        follower = frame.f_locals.get("acks")
        return (getattr(follower, "offset", 0) or frame.f_locals.get("offset", 0)) > 0

    def trainer() -> None:
        wait_for(waiter_has_read, 30, "the waiter's first read", interval=0.01)
        with open(rd.acks_path, "w"):
            pass
        rd.acknowledge("mine", "done", "paused")

    t = threading.Thread(target=trainer, daemon=True)
    t.start()
    ack = rd.wait_for_ack("mine", timeout=60, poll=0.05)
    t.join(30)
    assert ack is not None and ack["detail"] == "paused"


# --------------------------------------------------------------------------- points 1, 3, 7 with a live trainer


@pytest.mark.slow
def test_a_live_run_survives_bad_lines_truncation_replacement_and_symlinks(tmp_path):
    logdir = tmp_path / "runs"
    proc = start_live(logdir, "live", "logging.every_steps=5")
    rd = RunDir(logdir / "live")
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    try:
        plant(rd.control_path, list(BAD_CONTROL_LINES.values()))
        plant(rd.acks_path, BAD_ACK_LINES)
        assert control_and_wait(logdir, "live", "pause")["status"] == "done"
        assert len(rejected(rd)) == len(BAD_CONTROL_LINES), rejected(rd)
        assert wait_for_state(logdir, "live", ("paused",), timeout=30)["state"] == "paused"

        with open(rd.control_path, "w"):  # point 7: `: > control.jsonl`
            pass
        assert control_and_wait(logdir, "live", "resume", timeout=30)["status"] == "done"
        replacement = tmp_path / "control.new"
        append_record(replacement, {"id": "replaced1", "command": "checkpoint", "source": "test", "time": 1.0})
        os.replace(replacement, rd.control_path)
        ack = rd.wait_for_ack("replaced1", timeout=30)
        assert ack is not None and ack["status"] == "done", ack

        with open(rd.acks_path, "w"):  # a CLI waiting on a truncated acks file still gets its answer
            pass
        cli = tbhealth("pause", str(rd.path), "--timeout", "60")
        assert cli.returncode == 0, cli.stdout + cli.stderr

        rd.log_path.unlink()  # point 3: the log becomes a link to a file outside the run
        rd.log_path.symlink_to(outside)
        assert control_and_wait(logdir, "live", "resume", timeout=30)["status"] == "done"  # logs a line
        wait_for(lambda: stat.S_ISREG(os.lstat(rd.log_path).st_mode), 30, "log.jsonl to be a plain file again")
        assert outside.read_text() == "", "the trainer wrote through the symlink"
        assert wait_for_state(logdir, "live", ("training",), timeout=30)["state"] == "training"
    finally:
        end_live(proc, logdir, "live")
    assert proc.returncode == 0 and rd.read_status()["state"] == "stopped"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished one-epoch run of ``TINY``: (config file, logdir)."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    result = tbhealth("train", str(cfg), "--logdir", str(root / "runs"), "--quiet", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return cfg, root / "runs"


@pytest.mark.slow
def test_resume_survives_bad_lines_and_never_writes_through_symlinks(tiny_run, tmp_path):
    cfg, base = tiny_run
    logdir = tmp_path / "runs"
    shutil.copytree(base, logdir)
    rd = RunDir(logdir / "tiny")
    plant(rd.control_path, list(BAD_CONTROL_LINES.values()))
    plant(rd.acks_path, BAD_ACK_LINES)
    targets = {}
    for p in (rd.log_path, rd.alerts_path, rd.status_path):
        target = tmp_path / f"outside-{p.name}"
        target.write_text("untouched\n")
        targets[p] = target
        p.unlink(missing_ok=True)
        p.symlink_to(target)
    result = tbhealth("train", str(cfg), "--logdir", str(logdir), "--resume", "--set", "epochs=2", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(rejected(rd)) == len(BAD_CONTROL_LINES)
    for p, target in targets.items():
        assert target.read_text() == "untouched\n", f"{p.name} was written through its symlink"
    for p in (rd.log_path, rd.status_path):  # written by the resumed run (it raised no alert)
        assert stat.S_ISREG(os.lstat(p).st_mode), p
    assert rd.read_status()["state"] == "completed"

    fake = tmp_path / "fake-state"  # now the whole plugins/tbhealth folder is a link
    shutil.copytree(rd.state_dir, fake)
    before = {p.name: p.read_bytes() for p in fake.iterdir()}
    shutil.rmtree(rd.state_dir)
    rd.state_dir.symlink_to(fake, target_is_directory=True)
    result = tbhealth("train", str(cfg), "--logdir", str(logdir), "--resume", "--set", "epochs=3", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p.name: p.read_bytes() for p in fake.iterdir()} == before, "the trainer wrote into the linked folder"
    assert not rd.state_dir.is_symlink() and rd.read_status()["state"] == "completed"


# --------------------------------------------------------------------------- point 10


@pytest.mark.slow
def test_every_file_a_run_creates_follows_the_umask(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    result = tbhealth("train", str(cfg), "--logdir", str(tmp_path / "runs"), "--quiet", cwd=tmp_path, umask=0o027)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "tiny"
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"status.json", "config.yaml", "log.jsonl", "last.pt", "best.pt"} <= names, names
    modes = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o640"}, modes
    folders = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in run.rglob("*") if p.is_dir()}
    assert set(folders.values()) == {"0o750"}, folders


# --------------------------------------------------------------------------- point 2


_SWAPPER = """
import os, sys
ckpt, secret, real = sys.argv[1:4]
link, copy = ckpt + ".link", ckpt + ".copy"
while True:
    try:
        os.symlink(secret, link)
        os.replace(link, ckpt)
        with open(copy, "wb") as f:
            f.write(open(real, "rb").read())
        os.replace(copy, ckpt)
    except OSError:
        pass
"""


def test_a_checkpoint_swapped_for_a_symlink_while_downloading_is_never_served(tmp_path_factory):
    """A separate process swaps ``checkpoints/x.pt`` between a real checkpoint and a link to a
    secret outside the logdir as fast as it can, while the test downloads it over and over."""
    base = finished_runs(tmp_path_factory)
    root = tmp_path_factory.mktemp("race")
    logdir = root / "logdir"
    shutil.copytree(base / "r1", logdir / "r1")
    secret = root / "secret.bin"
    secret.write_bytes(b"SECRET" * 1000)
    real = logdir / "r1" / "checkpoints" / "last.pt"
    ckpt = real.with_name("x.pt")
    shutil.copy(real, ckpt)
    client = make_app(logdir)
    swapper = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(ckpt), str(secret), str(real)])
    served = 0
    try:
        for _ in range(1500):
            r = client.get(PREFIX + "/checkpoint", query_string={"run": "r1", "name": "x.pt"})
            body = r.get_data()
            assert b"SECRET" not in body, "a checkpoint swapped for a symlink was served"
            assert r.status_code in (200, 404), r.status_code
            if r.status_code == 200:
                assert body == real.read_bytes()
                served += 1
    finally:
        swapper.kill()
        swapper.wait(10)
    assert served > 0, "the real checkpoint was never served: the race did not run"


def test_a_regular_file_where_a_state_folder_belongs_is_reported_not_removed(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "plugins").write_text("someone's notes")
    with pytest.raises(OSError, match="plugins is a regular file, not a folder"):
        rd.append_log("INFO", "x")
    assert (tmp_path / "plugins").read_text() == "someone's notes"
    assert rd.read_status_checked() == (None, "plugins is a regular file, not a folder")

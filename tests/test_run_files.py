"""The run-directory format (tbhealth.run): atomicity, concurrent appends, crash fencing,
offsets, run-name validation and run discovery. Fast: no training, real files and processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from tbhealth.run.files import FORMAT_VERSION, append_record, read_records

from tbhealth.run.names import list_run_dirs, resolve_run, run_name, unique_run_dir

from tbhealth.run.states import FINAL_STATES, STALE_AFTER_S, UNRESPONSIVE, effective_state, is_live
from tbhealth.monitor.control import ControlChannel
from tbhealth.run.names import RunNameError
from tbhealth.run.rundir import RunDir

# --------------------------------------------------------------------------- workers (spawned)


def _rewrite_status(path: str, times: int, ready) -> None:
    rd = RunDir(path)
    rd.write_status({"state": "training", "global_step": 0})
    ready.set()
    pad = "x" * 20_000  # a file larger than one write() so a torn file would show
    for i in range(1, times + 1):
        rd.write_status({"state": "training", "global_step": i, "pad": pad})


def _append_many(path: str, writer: int, count: int, barrier) -> None:
    barrier.wait()
    pad = "y" * 5_000  # well above PIPE_BUF: interleaving would tear lines without the lock
    for i in range(count):
        append_record(Path(path), {"writer": writer, "i": i, "pad": pad})


def _spawn():
    return mp.get_context("spawn")


# --------------------------------------------------------------------------- atomic snapshots


def test_status_reader_never_sees_a_partial_file(tmp_path):
    """A reader in a tight loop, 500 rewrites by another process: every read is complete JSON."""
    ctx = _spawn()
    ready = ctx.Event()
    writer = ctx.Process(target=_rewrite_status, args=(str(tmp_path), 500, ready))
    writer.start()
    assert ready.wait(60), "writer process did not start"
    status_path = RunDir(tmp_path).status_path
    reads, steps, bad = 0, set(), []
    while writer.is_alive() or reads == 0:
        try:
            text = status_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            bad.append("<missing>")  # os.replace never leaves the name absent
            continue
        try:
            data = json.loads(text)
        except ValueError:
            bad.append(text[:80])
            continue
        reads += 1
        steps.add(data["global_step"])
    writer.join(30)
    assert writer.exitcode == 0
    assert bad == []
    assert reads > 50 and len(steps) > 10, (reads, len(steps))  # the reader really overlapped the writes
    final = RunDir(tmp_path).read_status()
    assert final["global_step"] == 500 and final["v"] == FORMAT_VERSION
    assert not [p for p in status_path.parent.iterdir() if p.name.endswith(".tmp")], "temp files left behind"


def test_read_status_of_missing_or_garbage_file_is_none(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.read_status() is None
    rd.state_dir.mkdir(parents=True)
    rd.status_path.write_text('{"state": "train')
    assert rd.read_status() is None
    rd.status_path.write_text("[1, 2]")
    assert rd.read_status() is None
    rd.status_path.write_text('{"global_step": 3}')  # no state: not a status
    assert rd.read_status() is None


# --------------------------------------------------------------------------- append-only records


def test_concurrent_appends_from_four_processes_keep_every_line_whole(tmp_path):
    path = tmp_path / "records.jsonl"
    ctx = _spawn()
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 200, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == 800
    parsed = [json.loads(line) for line in lines]  # every line is one whole record
    assert all(r["v"] == FORMAT_VERSION and len(r["pad"]) == 5_000 for r in parsed)
    for w in range(4):
        mine = [r["i"] for r in parsed if r["writer"] == w]
        assert mine == list(range(200)), f"writer {w}: records lost, doubled or reordered"
    records, offset = read_records(path)
    assert len(records) == 800 and offset == len(raw)


def test_line_cut_short_by_a_crash_is_fenced_and_skipped(tmp_path):
    rd = RunDir(tmp_path)
    rid = rd.request_control("pause")
    with open(rd.control_path, "ab") as f:  # a writer that died mid-line
        f.write(b'{"v":1,"id":"dead","command":"sto')
    rid2 = rd.request_control("resume")
    lines = rd.control_path.read_bytes().split(b"\n")
    assert lines[1] == b'{"v":1,"id":"dead","command":"sto', "the partial line stays on a line of its own"
    assert json.loads(lines[2])["id"] == rid2, "the next record starts on a fresh line"

    requests, offset = rd.read_control(0)
    assert [r.id for r in requests if r.error is None] == [rid, rid2]
    assert [r.command for r in requests if r.error is None] == ["pause", "resume"]
    broken = [r for r in requests if r.error is not None]
    assert len(broken) == 1 and broken[0].command == "" and "not a JSON object" in broken[0].error
    assert offset == rd.control_path.stat().st_size

    # the log and alert readers drop such a line instead of failing on it
    rd.append_log("info", "one")
    with open(rd.log_path, "ab") as f:
        f.write(b'{"time": 1, "lev')
    rd.append_log("warning", "two")
    log, _ = rd.read_log()
    assert [(r["level"], r["message"]) for r in log] == [("INFO", "one"), ("WARNING", "two")]
    rd.append_alert({"id": "a1", "rule": "divergence", "resolved": False})
    with open(rd.alerts_path, "ab") as f:
        f.write(b'{"id": "a1", "resol')
    rd.append_alert({"id": "a1", "resolved": True})
    alerts = rd.read_alerts()
    assert alerts == [{"id": "a1", "rule": "divergence", "resolved": True}]


def test_read_records_does_not_consume_an_incomplete_trailing_line(tmp_path):
    path = tmp_path / "r.jsonl"
    assert read_records(path, 0) == ([], 0)  # missing file: nothing, same offset
    append_record(path, {"n": 1})
    first_len = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"v":1,"n":')  # still being written
    records, offset = read_records(path, 0)
    assert [r["n"] for r in records] == [1] and offset == first_len
    assert read_records(path, offset) == ([], offset), "nothing complete yet"
    with open(path, "ab") as f:
        f.write(b'2}\n')
    records, offset2 = read_records(path, offset)
    assert [r["n"] for r in records] == [2] and offset2 == path.stat().st_size
    append_record(path, {"n": 3})
    records, offset3 = read_records(path, offset2)
    assert [r["n"] for r in records] == [3] and offset3 == path.stat().st_size
    # each record is returned exactly once when reading on from the returned offsets
    assert [r["n"] for r in read_records(path, 0)[0]] == [1, 2, 3]


def test_control_channel_sees_each_request_once_however_many_arrive_between_polls(tmp_path):
    rd = RunDir(tmp_path)
    rd.state_dir.mkdir(parents=True)
    channel = ControlChannel(rd, interval=0.0)
    assert channel.reject_stale() == 0
    assert channel.poll() == []
    sent = [rd.request_control(c) for c in ("pause", "resume", "checkpoint", "pause", "stop")]
    got = channel.poll()
    assert [r.id for r in got] == sent
    assert channel.poll() == []
    later = rd.request_control("resume")
    assert [r.id for r in channel.poll()] == [later]


def test_requests_left_from_before_start_are_rejected_once(tmp_path):
    rd = RunDir(tmp_path)
    old = rd.request_control("pause")
    assert ControlChannel(rd).reject_stale() == 1
    ack = rd.read_acks()[old]
    assert ack["status"] == "rejected" and "not live" in ack["detail"]
    assert ControlChannel(rd).reject_stale() == 0, "a second start does not answer it again"
    assert len(read_records(rd.acks_path)[0]) == 1


def test_request_and_acknowledgement_round_trip(tmp_path):
    rd = RunDir(tmp_path)
    with pytest.raises(ValueError, match="allowed: pause, resume, stop, checkpoint"):
        rd.request_control("explode")
    rid = rd.request_control("checkpoint", source="test")
    (req,), _ = rd.read_control(0)
    assert (req.id, req.command, req.source, req.error) == (rid, "checkpoint", "test", None)
    assert abs(req.time - time.time()) < 5
    assert rd.wait_for_ack(rid, timeout=0.2) is None
    rd.acknowledge(rid, "done", "checkpoint written", path="/x/manual.pt")
    ack = rd.wait_for_ack(rid, timeout=1)
    assert ack["status"] == "done" and ack["path"] == "/x/manual.pt" and ack["v"] == FORMAT_VERSION


def test_requests_without_id_or_with_unknown_command_carry_an_error(tmp_path):
    rd = RunDir(tmp_path)
    append_record(rd.control_path, {"command": "pause"})
    append_record(rd.control_path, {"id": "k", "command": "explode"})
    append_record(rd.control_path, {"id": "", "command": "stop"})
    reqs, _ = rd.read_control(0)
    assert [r.error is not None for r in reqs] == [True, True, True]
    assert "no id" in reqs[0].error and "unknown command 'explode'" in reqs[1].error
    assert len({r.id for r in reqs}) == 3, "each rejected line gets its own id to acknowledge"


# --------------------------------------------------------------------------- run names


HOSTILE_NAMES = [
    "..",
    "../x",
    "a/../..",
    "a/..",
    "/etc",
    "/",
    "a//b",
    "./a",
    "a/.",
    "a\\..\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    "",
    "x" * 513,
    "a b",
    "~",
    "a/b/",
    "c:/x",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_resolve_run_refuses_hostile_names(tmp_path, name):
    with pytest.raises(RunNameError):
        resolve_run(tmp_path, name)


@pytest.mark.parametrize("name", [None, 3, b"run"], ids=repr)
def test_resolve_run_refuses_non_strings(tmp_path, name):
    with pytest.raises(RunNameError):
        resolve_run(tmp_path, name)


def test_resolve_run_accepts_plain_names(tmp_path):
    base = tmp_path.resolve()
    assert resolve_run(tmp_path, ".") == base
    assert resolve_run(tmp_path, "mnist") == base / "mnist"
    assert resolve_run(tmp_path, "sweep/lr=0.1@2") == base / "sweep" / "lr=0.1@2"
    assert resolve_run(tmp_path, "x" * 255) == base / ("x" * 255)
    assert resolve_run(tmp_path, "/".join(["y" * 255] * 2)) == base / ("y" * 255) / ("y" * 255)


@pytest.mark.parametrize("name", ["x" * 256, "a/" + "x" * 256, "x" * 513])
def test_resolve_run_refuses_parts_no_filesystem_can_hold(tmp_path, name):
    with pytest.raises(RunNameError):
        resolve_run(tmp_path, name)


def test_symlink_out_of_the_logdir_is_refused(tmp_path):
    logdir, outside = tmp_path / "logdir", tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    logdir.mkdir()
    (logdir / "escape").symlink_to(outside, target_is_directory=True)
    (logdir / "real").mkdir()
    (logdir / "alias").symlink_to(logdir / "real", target_is_directory=True)
    with pytest.raises(RunNameError, match="outside the logdir"):
        resolve_run(logdir, "escape")
    with pytest.raises(RunNameError, match="outside the logdir"):
        resolve_run(logdir, "escape/secret")
    assert resolve_run(logdir, "alias") == (logdir / "real").resolve()  # inside: fine


def test_run_name_is_the_path_relative_to_the_logdir(tmp_path):
    assert run_name(tmp_path, tmp_path / "a" / "b") == "a/b"
    assert run_name(tmp_path, tmp_path) == "."


def test_unique_run_dir_adds_suffixes(tmp_path):
    made = [unique_run_dir(tmp_path / "logs", "exp") for _ in range(3)]
    assert [p.name for p in made] == ["exp", "exp-2", "exp-3"]
    assert all(p.is_dir() for p in made)
    (tmp_path / "logs" / "exp-4").mkdir()
    assert unique_run_dir(tmp_path / "logs", "exp").name == "exp-5"
    assert unique_run_dir(tmp_path / "logs", "group/exp").relative_to(tmp_path / "logs") == Path("group/exp")
    with pytest.raises(RunNameError):
        unique_run_dir(tmp_path / "logs", "../exp")
    assert not (tmp_path / "exp").exists()


# --------------------------------------------------------------------------- states


def test_effective_state():
    now = 1_000_000.0
    fresh = now - 1
    stale = now - STALE_AFTER_S - 0.5
    for state in ("starting", "training", "paused", "stopping"):
        assert effective_state({"state": state, "updated_at": fresh}, now) == state
        assert effective_state({"state": state, "updated_at": stale}, now) == UNRESPONSIVE
        assert effective_state({"state": state}, now) == UNRESPONSIVE  # no heartbeat at all
        assert effective_state({"state": state, "updated_at": "soon"}, now) == UNRESPONSIVE
    for state in FINAL_STATES:
        assert effective_state({"state": state, "updated_at": stale - 1e6}, now) == state
        assert effective_state({"state": state}, now) == state
    assert is_live("paused") and not is_live(UNRESPONSIVE)
    assert not any(is_live(s) for s in (*FINAL_STATES, "stopping"))


def test_read_status_reports_unresponsive_and_keeps_the_reported_state(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_status({"state": "paused"})
    written = rd.read_status()
    assert written["state"] == "paused" and written["reported_state"] == "paused"
    later = rd.read_status(now=written["updated_at"] + STALE_AFTER_S + 1)
    assert later["state"] == UNRESPONSIVE and later["reported_state"] == "paused"
    rd.write_status({"state": "completed"})
    assert rd.read_status(now=time.time() + 1e6)["state"] == "completed"


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["../last.pt", "..", "a/last.pt", "/etc/passwd", ".hidden.pt", "last.pt/",
                                  "last.txt", "", "last.pt\x00", "..\\last.pt", None])
def test_checkpoint_file_refuses_traversal_and_odd_names(tmp_path, name):
    rd = RunDir(tmp_path / "run")
    rd.checkpoint_dir.mkdir(parents=True)
    (rd.checkpoint_dir / "last.pt").write_bytes(b"x")
    (rd.checkpoint_dir / ".hidden.pt").write_bytes(b"x")
    (tmp_path / "last.pt").write_bytes(b"outside")
    assert rd.checkpoint_file(name) is None


def test_checkpoint_file_and_listing(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.list_checkpoints() == [] and rd.checkpoint_file("last.pt") is None
    rd.checkpoint_dir.mkdir()
    for i, name in enumerate(["epoch-5.pt", "best.pt", "last.pt"]):
        path = rd.checkpoint_dir / name
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    (rd.checkpoint_dir / "notes.txt").write_text("not a checkpoint")
    (rd.checkpoint_dir / "dir.pt").mkdir()
    assert [p.name for p in rd.list_checkpoints()] == ["epoch-5.pt", "best.pt", "last.pt"]
    assert rd.checkpoint_file("best.pt") == rd.checkpoint_dir / "best.pt"
    assert rd.checkpoint_file("missing.pt") is None and rd.checkpoint_file("dir.pt") is None


# --------------------------------------------------------------------------- discovery


def _make_run(path: Path) -> None:
    RunDir(path).write_status({"state": "completed"})


def test_list_run_dirs_finds_nested_runs_and_skips_state_folders(tmp_path):
    for name in ("a", "group/b", "group/deeper/c", "a/nested-inside-a"):
        _make_run(tmp_path / name)
    _make_run(tmp_path / "a" / "checkpoints" / "x")
    _make_run(tmp_path / "checkpoints" / "y")
    _make_run(tmp_path / "plugins" / "z")
    _make_run(tmp_path / ".hidden")
    _make_run(tmp_path / "1" / "2" / "3" / "too-deep")
    (tmp_path / "empty").mkdir()
    (tmp_path / "tb-only").mkdir()
    (tmp_path / "tb-only" / "events.out.tfevents.1").write_bytes(b"")
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    _make_run(outside / "o")
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    found = sorted(run_name(tmp_path, p) for p in list_run_dirs(tmp_path))
    assert found == ["a", "group/b", "group/deeper/c"]
    _make_run(tmp_path)
    assert list_run_dirs(tmp_path) == [tmp_path], "a logdir that is itself a run"


def test_records_carry_the_format_version(tmp_path):
    rd = RunDir(tmp_path)
    rd.append_log("info", "x")
    rd.append_alert({"id": "1"})
    rid = rd.request_control("pause")
    rd.acknowledge(rid, "done")
    rd.write_status({"state": "training"})
    for path in (rd.log_path, rd.alerts_path, rd.control_path, rd.acks_path):
        assert all(r["v"] == FORMAT_VERSION for r in read_records(path)[0])
    assert json.loads(rd.status_path.read_text())["v"] == FORMAT_VERSION


def test_checkpoint_symlink_out_of_the_run_is_refused(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.checkpoint_dir.mkdir(parents=True)
    secret = tmp_path / "secret.pt"
    secret.write_text("not yours")
    (rd.checkpoint_dir / "evil.pt").symlink_to(secret)
    assert rd.checkpoint_file("evil.pt") is None
    assert rd.list_checkpoints() == []

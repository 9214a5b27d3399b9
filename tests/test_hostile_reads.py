"""Issue #11, readers: run state damaged, swapped or planted by anyone who can write to the logdir.

Every reader (``GET runs|status|alerts|logs|ack``, ``tbhealth runs|status|alerts``) must list a bad
run as unreadable with the reason and keep serving the others; never follow a symlink out of a
run; never hang on a FIFO; never answer 500 or print a traceback. The good runs are real
trainings (``finished_runs``); the damage is done to copies of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbhealth.run.rundir import RunDir
from tbhealth_cli.app import app
from tbhealth_plugin import api
from tests.plugin_helpers import (
    PREFIX, finished_runs, free_port, make_app, post_control, start_tensorboard, stop_process,
    wait_for, wait_for_listing,
)

SECRET = "SECRET-4f1c"
STATE = Path("plugins") / "tbhealth"
runner = CliRunner()


def deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def status_text(good: dict, **change) -> str:
    return json.dumps({**good, **change})


def unblock_fifo(path: Path) -> None:
    """Open a FIFO for writing once, so a reader stuck in ``open`` (the bug) gets EOF and returns."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


# Bad status files: name -> (how to damage a copy of r1, a fragment of the reason readers give).
BAD_STATUS = {
    "state-list": (lambda p, good: p.write_text(status_text(good, state=["training"])), "state"),
    "started-nan": (lambda p, good: p.write_text(status_text(good, started_at=float("nan"))), "started_at"),
    "metrics-list": (lambda p, good: p.write_text(status_text(good, metrics=[1, 2])), "metrics"),
    "deep": (lambda p, good: p.write_text('{"state": "completed", "x": ' + deep() + "}"), "nested"),
    "not-json": (lambda p, good: p.write_text("{oops"), "JSON"),
    "fifo": (lambda p, good: (p.unlink(), os.mkfifo(p)), "regular file"),
    "folder": (lambda p, good: (p.unlink(), p.mkdir()), "regular file"),
    "symlink": (lambda p, good: (p.unlink(), p.symlink_to(p.parents[4] / "outside" / "status.json")), "link"),
}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """r1 and r2 (real trainings), a copy of r1 per kind of damage, and files outside the logdir."""
    base = finished_runs(tmp_path_factory)
    root = tmp_path_factory.mktemp("hostile-reads")
    logdir = root / "logdir"
    shutil.copytree(base, logdir)
    outside = root / "outside"
    outside.mkdir()
    good = json.loads((logdir / "r1" / STATE / "status.json").read_text())
    (outside / "status.json").write_text(json.dumps({**good, "run": SECRET, "message": SECRET}))
    secret_line = json.dumps({"v": 1, "id": "s1", "time": 1.0, "level": "INFO", "message": SECRET,
                              "rule": "x", "severity": "warning"}) + "\n"
    (outside / "records.jsonl").write_text(secret_line * 3)
    for name, (damage, _) in BAD_STATUS.items():
        shutil.copytree(logdir / "r1", logdir / name)
        damage(logdir / name / STATE / "status.json", good)
    yield logdir
    for name in ("fifo",):
        unblock_fifo(logdir / name / STATE / "status.json")


@pytest.fixture(scope="module")
def client(logdir):
    return make_app(logdir)


def get(client, route, **params):
    """A request that must come back (a hung reader fails the test instead of hanging it)."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", client.get(PREFIX + route, query_string=params)),
                         daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"GET {route} {params} hung"
    return out["r"]


def invoke(*args: str):
    """``tbhealth ARGS`` in-process; a user-facing failure is a SystemExit, never an exception."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", runner.invoke(app, list(args))), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"tbhealth {' '.join(args)} hung"
    result = out["r"]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


# --------------------------------------------------------------------------- runs (point 4)


def test_get_runs_lists_bad_runs_as_unreadable_and_keeps_the_others(client):
    r = get(client, "/runs")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert SECRET not in r.get_data(as_text=True)
    rows = {row["run"]: row for row in r.get_json()["runs"]}
    assert rows["r1"]["state"] == "completed" and rows["r2"]["state"] in ("completed", "stopped")
    for name, (_, reason) in BAD_STATUS.items():
        assert rows[name]["state"] == "unknown", (name, rows[name])
        assert reason in rows[name]["error"], (name, rows[name]["error"])
    assert "error" not in rows["r1"]


def test_tbhealth_runs_lists_bad_runs_as_unreadable_and_keeps_the_others(logdir):
    result = invoke("runs", str(logdir), "--json")
    assert result.exit_code == 0, result.output
    rows = {row["run"]: row for row in json.loads(result.output)}
    assert rows["r1"]["state"] == "completed"
    for name, (_, reason) in BAD_STATUS.items():
        assert rows[name]["state"] == "unknown" and reason in rows[name]["error"], rows[name]
    table = invoke("runs", str(logdir))
    assert table.exit_code == 0 and "r1" in table.output and "unreadable" in table.output
    assert SECRET not in result.output + table.output


@pytest.mark.parametrize("name", list(BAD_STATUS))
def test_status_of_a_bad_run_is_a_clear_error(client, logdir, name):
    r = get(client, "/status", run=name)
    assert r.status_code == 404, r.get_data(as_text=True)
    assert BAD_STATUS[name][1] in r.get_json()["error"] and SECRET not in r.get_data(as_text=True)
    result = invoke("status", name, "--logdir", str(logdir))
    assert result.exit_code == 1 and BAD_STATUS[name][1] in " ".join(result.output.split()), result.output
    assert SECRET not in result.output


def test_a_run_folder_without_read_permission_is_listed_as_unreadable(tmp_path_factory):
    """Run as another user when the tests run as root (root reads anything)."""
    base = finished_runs(tmp_path_factory)
    root = Path(tempfile.mkdtemp(prefix="tbh-perm-"))  # under /tmp, traversable by an unprivileged user
    try:
        os.chmod(root, 0o755)
        shutil.copytree(base / "r1", root / "r1")
        shutil.copytree(base / "r1", root / "locked")
        for d, _, files in os.walk(root):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        os.chmod(root / "locked", 0)
        cmd = [sys.executable, "-m", "tbhealth_cli.app", "runs", str(root), "--json"]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot drop privileges")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HOME": str(root)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=root)
        assert proc.returncode == 0, proc.stderr
        rows = {row["run"]: row for row in json.loads(proc.stdout)}
        assert rows["r1"]["state"] == "completed"
        assert rows["locked"]["state"] == "unknown" and "ermission" in rows["locked"]["error"]
    finally:
        os.chmod(root / "locked", 0o755)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- alerts, logs, acks (points 1, 3, 4)


@pytest.fixture(scope="module")
def bad_records(logdir):
    """A run whose alerts, log and acks hold hostile lines among good ones."""
    rd = RunDir(logdir / "bad-records")
    shutil.copytree(logdir / "r1", rd.path)
    good = {"rule": "overfitting", "severity": "warning", "message": "good alert", "epoch": 1, "step": 3,
            "time": 1_700_000_000.0, "layer": None, "value": 1.0, "threshold": 0.5, "resolved": False}
    with open(rd.alerts_path, "a") as f:
        f.write(json.dumps({"v": 1, **good, "id": "good-1"}) + "\n")
        f.write(json.dumps({"v": 1, **good, "id": ["x"], "message": "list id"}) + "\n")
        f.write(json.dumps({"v": 1, **good, "id": "far", "time": 1e20, "message": "far future"}) + "\n")
        f.write(json.dumps({"v": 1, **good, "id": "bad-epoch", "epoch": "three"}) + "\n")
        f.write('{"v": 1, "id": "deep", "x": ' + deep() + "}\n")
    with open(rd.log_path, "a") as f:
        f.write('{"v": 1, "time": 1, "level": "INFO", "message": ' + deep() + "}\n")
        f.write('{"v": 1, "time": 1, "level": "INFO", "message": "after the deep line"}\n')
    with open(rd.acks_path, "a") as f:
        f.write(json.dumps({"v": 1, "id": ["x"], "status": "done", "detail": "list id"}) + "\n")
        f.write(json.dumps({"v": 1, "id": {"a": 1}, "status": "done", "detail": "dict id"}) + "\n")
        f.write(json.dumps({"v": 1, "id": "abc123", "status": "done", "detail": "real"}) + "\n")
    rd.request_control("pause", source="test")  # so `abc123` is not the only id in the control file
    return rd


def test_bad_alert_records_are_skipped_by_every_reader(client, logdir, bad_records):
    r = get(client, "/alerts", run="bad-records")
    assert r.status_code == 200, r.get_data(as_text=True)
    ids = [a["id"] for a in r.get_json()["alerts"]]
    assert "good-1" in ids and "far" not in ids and "bad-epoch" not in ids and "deep" not in ids
    cursor = r.get_json()["cursor"]
    assert get(client, "/alerts", run="bad-records", after=str(cursor)).get_json()["alerts"] == []
    for args in (["alerts", "bad-records", "--json"], ["alerts", "bad-records"], ["status", "bad-records"]):
        result = invoke(*args, "--logdir", str(logdir))
        assert result.exit_code == 0, (args, result.output)
        assert "good alert" in result.output or "good-1" in result.output or args[0] == "status"


def test_a_deeply_nested_log_line_is_skipped(client, bad_records):
    r = get(client, "/logs", run="bad-records")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["records"][-1]["message"] == "after the deep line"


def test_bad_ack_lines_do_not_break_get_ack(client, bad_records):
    rid = bad_records.request_control("pause", source="test")
    bad_records.acknowledge(rid, "done", "paused")
    r = get(client, "/ack", run="bad-records", id=rid)
    assert r.status_code == 200 and r.get_json()["status"] == "done", r.get_data(as_text=True)
    assert set(bad_records.read_acks()) >= {rid, "abc123"}


# --------------------------------------------------------------------------- symlinked and odd state files (points 3, 4)


@pytest.fixture(scope="module")
def linked(logdir):
    """A run whose log and alerts are symlinks to a file outside the logdir, and one whose whole
    ``plugins/tbhealth`` folder is a symlink to a folder outside it."""
    rd = RunDir(logdir / "linked")
    shutil.copytree(logdir / "r1", rd.path)
    outside = logdir.parent / "outside"
    for p in (rd.log_path, rd.alerts_path):
        p.unlink(missing_ok=True)
        p.symlink_to(outside / "records.jsonl")
    folder = RunDir(logdir / "linked-folder")
    shutil.copytree(logdir / "r1", folder.path)
    fake = outside / "fake-state"
    shutil.copytree(folder.state_dir, fake)
    for p in (fake / "log.jsonl", fake / "alerts.jsonl"):
        shutil.copy(outside / "records.jsonl", p)
    (fake / "status.json").write_text((outside / "status.json").read_text())
    shutil.rmtree(folder.state_dir)
    folder.state_dir.symlink_to(fake, target_is_directory=True)
    return rd


@pytest.mark.parametrize("route", ["/logs", "/alerts"])
def test_symlinked_records_are_never_served(client, linked, route):
    r = get(client, route, run="linked")
    assert SECRET not in r.get_data(as_text=True)
    assert r.status_code == 404 and "link" in r.get_json()["error"], r.get_data(as_text=True)


@pytest.mark.parametrize("route", ["/status", "/logs", "/alerts"])
def test_a_symlinked_state_folder_is_never_followed(client, linked, route):
    r = get(client, route, run="linked-folder")
    assert SECRET not in r.get_data(as_text=True)
    assert r.status_code == 404, r.get_data(as_text=True)


def test_tbhealth_alerts_never_follows_a_symlink(logdir, linked):
    for name in ("linked", "linked-folder"):
        result = invoke("alerts", name, "--logdir", str(logdir), "--json")
        assert SECRET not in result.output and result.exit_code == 1, result.output


def test_post_control_never_writes_through_a_symlink(logdir, client):
    rd = RunDir(logdir / "live-link")
    shutil.copytree(logdir / "r1", rd.path)
    status = rd.read_status()
    rd.write_status({**status, "state": "training"})  # looks live to the plugin
    target = logdir.parent / "outside" / "control-target.jsonl"
    target.write_text("")
    rd.control_path.unlink(missing_ok=True)
    rd.control_path.symlink_to(target)
    r = post_control(client, {"run": "live-link", "command": "pause"})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert target.read_text() == "", "the request went through the symlink"
    assert not rd.control_path.is_symlink()
    assert [c.id for c in rd.read_control(0)[0]] == [r.get_json()["id"]]


@pytest.mark.parametrize("name", ["log.jsonl", "alerts.jsonl"])
def test_a_fifo_in_place_of_a_record_file_does_not_hang_a_reader(logdir, client, name):
    run = f"fifo-{name.split('.')[0]}"
    rd = RunDir(logdir / run)
    shutil.copytree(logdir / "r1", rd.path)
    (rd.state_dir / name).unlink(missing_ok=True)
    os.mkfifo(rd.state_dir / name)
    try:
        r = get(client, {"log.jsonl": "/logs", "alerts.jsonl": "/alerts"}[name], run=run)
        assert r.status_code == 404 and "regular file" in r.get_json()["error"], r.get_data(as_text=True)
        result = invoke("alerts", run, "--logdir", str(logdir))
        assert result.exit_code in (0, 1)
    finally:
        unblock_fifo(rd.state_dir / name)


@pytest.mark.slow
def test_fifos_do_not_leak_tensorboard_threads(logdir):
    """A real TensorBoard: requests on FIFO state files come back and leave no thread behind."""
    port = free_port()
    proc = start_tensorboard(logdir, port)
    try:
        wait_for_listing(port)
        import urllib.error
        import urllib.request

        def fetch(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}{PREFIX}{path}", timeout=30) as resp:
                    resp.read()
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code

        def threads() -> int:
            return len(os.listdir(f"/proc/{proc.pid}/task"))

        assert fetch("/runs") == 200
        before = threads()
        for _ in range(10):
            assert fetch("/status?run=fifo") == 404
            assert fetch("/runs") == 200
        wait_for(lambda: threads() <= before, 30, "TensorBoard's request threads to end")
    finally:
        unblock_fifo(logdir / "fifo" / STATE / "status.json")
        stop_process(proc)


# --------------------------------------------------------------------------- point 11


def test_a_512_character_run_name_is_a_400(client):
    for name in ("a" * 512, "a" * 300, "/".join(["b" * 200] * 2)):
        r = get(client, "/status", run=name)
        assert r.status_code in (400, 404) and r.get_json()["error"], (len(name), r.status_code)
    assert get(client, "/status", run="a" * 512).status_code == 400


def test_a_deeply_nested_post_body_is_a_400(client):
    r = post_control(client, None, raw=b"[" * 4000 + b"]" * 0)
    assert r.status_code == 400, r.get_data(as_text=True)
    r = post_control(client, None, raw=b"[" * 2000 + b"]" * 2000)
    assert r.status_code == 400 and r.get_json()["error"], r.get_data(as_text=True)


def test_the_first_logs_request_reads_only_the_tail_of_a_long_log(logdir):
    """40 MB of log: the newest 1000 records come back without the whole file in memory."""
    rd = RunDir(logdir / "long-log")
    shutil.copytree(logdir / "r1", rd.path)
    line = json.dumps({"v": 1, "time": 1.0, "level": "INFO", "message": "x" * 380})
    n = 100_000
    with open(rd.log_path, "w") as f:
        for i in range(n):
            f.write(line.replace('"time":', f'"i": {i}, "time":', 1) + "\n")
    size = rd.log_path.stat().st_size
    assert size > 40_000_000
    tracemalloc.start()
    try:
        out = api.logs_impl(str(logdir), "long-log", 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["i"] for r in out["records"]] == list(range(n - api.MAX_LOG_RECORDS, n))
    assert out["offset"] == size and out["skipped"] == n - api.MAX_LOG_RECORDS
    assert peak < size / 4, f"logs_impl held {peak} bytes for a {size}-byte log"
    again = api.logs_impl(str(logdir), "long-log", out["offset"])
    assert again["records"] == [] and again["offset"] == size
    middle = api.logs_impl(str(logdir), "long-log", size - 10 * (len(line) + 10))
    assert len(middle["records"]) >= 9 and middle["skipped"] == 0


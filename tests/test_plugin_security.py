"""Hostile requests against the Health tab: paths out of the logdir, CSRF, DNS rebinding.

The control tests aim at a LIVE (paused) training, so a refused request is refused by the guard
under test and not because the run could not take it; a well-formed request at the end of each
table proves the run was listening. ``control.jsonl`` must not grow for any refused request.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tbhealth.run.rundir import RunDir
from tbhealth_plugin import api, guards
from tests.plugin_helpers import (
    CONTROL_HEADERS, PREFIX, control_and_wait, end_live, finished_runs, make_app, post_control, start_live,
)

HOSTILE_RUNS = [
    "../x", "..", "/etc", "/etc/passwd", "a/../../b", "r1/../../r1", "%2e%2e", "%2e%2e/%2e%2e/etc", "..%2f..%2fetc",
    "r1\x00", "\x00", "..\\..\\etc", "r1\\..\\..", "a" * 5000, "./r1", "r1/", "//etc", "~", "~root", "r1\n",
    "evil", "evil/plugins",
]
HOSTILE_CHECKPOINTS = ["../../../etc/passwd", "/etc/passwd", "..", ".hidden.pt", "last.pt/..", "..%2flast.pt",
                       "x.pt\x00", "escape.pt", "a" * 3000 + ".pt", "../config.yaml"]
FILE_ROUTES = ["/status", "/alerts", "/logs", "/scalars", "/checkpoint", "/ack", "/events", "/layers", "/config"]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """The shared finished runs, plus traps: a symlinked run and checkpoint leading outside."""
    base = finished_runs(tmp_path_factory)
    root = tmp_path_factory.mktemp("hostile")
    logdir = root / "logdir"
    shutil.copytree(base, logdir, symlinks=True)
    outside = root / "outside"
    shutil.copytree(base / "r1", outside / "r1")  # a real run dir, but outside the logdir
    (outside / "secret.pt").write_bytes(b"SECRET" * 100)
    os.symlink(outside / "r1", logdir / "evil")
    os.symlink(outside / "secret.pt", logdir / "r1" / "checkpoints" / "escape.pt")
    return logdir


@pytest.fixture(scope="module")
def client(logdir):
    return make_app(logdir)


@pytest.mark.parametrize("route", FILE_ROUTES)
@pytest.mark.parametrize("run", HOSTILE_RUNS)
def test_hostile_run_names_never_leave_the_logdir(client, route, run):
    r = client.get(PREFIX + route, query_string={"run": run, "name": "last.pt", "id": "abc"})
    assert r.status_code in (400, 404), (run, r.status_code)
    body = r.get_data()
    assert b"SECRET" not in body and b"root:" not in body
    assert r.get_json()["error"]


@pytest.mark.parametrize("run", HOSTILE_RUNS)
def test_hostile_run_names_in_the_pure_functions(logdir, run):
    for call in (lambda: api.status_impl(str(logdir), run), lambda: api.logs_impl(str(logdir), run),
                 lambda: api.alerts_impl(str(logdir), run), lambda: api.checkpoint_impl(str(logdir), run, "last.pt")):
        with pytest.raises(api.ApiError) as e:
            call()
        assert e.value.status in (400, 404)


def test_raw_encoded_traversal_in_the_query_string(client):
    for qs in ("run=%2e%2e%2fr1", "run=%252e%252e", "run=r1%00", "run=..%5c..%5cetc", "run=%2fetc"):
        r = client.get(f"{PREFIX}/status?{qs}")
        assert r.status_code in (400, 404), qs


@pytest.mark.parametrize("name", HOSTILE_CHECKPOINTS)
def test_hostile_checkpoint_names(client, logdir, name):
    r = client.get(PREFIX + "/checkpoint", query_string={"run": "r1", "name": name})
    assert r.status_code in (400, 404), name
    assert b"SECRET" not in r.get_data()


def test_the_symlink_traps_are_real(logdir):
    """Guard against a vacuous pass: the traps exist and lead outside."""
    assert (logdir / "evil" / "plugins" / "tbhealth" / "status.json").is_file()
    assert (logdir / "r1" / "checkpoints" / "escape.pt").read_bytes().startswith(b"SECRET")


# --------------------------------------------------------------------------- control: CSRF and DNS rebinding


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real training, paused (cheap while it waits), in its own logdir."""
    logdir = tmp_path_factory.mktemp("live")
    proc = start_live(logdir, "live")
    assert control_and_wait(logdir, "live", "pause")["status"] == "done"
    yield logdir
    end_live(proc, logdir, "live")


GOOD = {"run": "live", "command": "checkpoint"}
HOST = "localhost"  # werkzeug's test client sends Host: localhost


def refused(status, fragment, body=GOOD, headers=None, raw=None, method="POST"):
    return pytest.param(status, fragment, body, headers, raw, method, id=fragment or str(status))


@pytest.mark.parametrize("status, fragment, body, headers, raw, method", [
    refused(403, "cross-origin", headers={**CONTROL_HEADERS, "Origin": "http://evil.example"}),
    refused(403, "cross-origin", headers={**CONTROL_HEADERS, "Origin": "http://localhost:9999"}),
    refused(403, "cross-origin", headers={**CONTROL_HEADERS, "Origin": "https://localhost:8443"}),
    refused(403, "opaque origin", headers={**CONTROL_HEADERS, "Origin": "null"}),
    refused(403, "malformed Origin", headers={**CONTROL_HEADERS, "Origin": "javascript:alert(1)"}),
    refused(403, "not this TensorBoard", headers={**CONTROL_HEADERS, "Host": "evil.example"}),
    refused(403, "not this TensorBoard",  # DNS rebinding: Origin and Host agree, the name is foreign
            headers={**CONTROL_HEADERS, "Host": "evil.example:6006", "Origin": "http://evil.example:6006"}),
    refused(403, "not this TensorBoard", headers={**CONTROL_HEADERS, "Host": "localhost.evil.example"}),
    refused(403, "not this TensorBoard", headers={**CONTROL_HEADERS, "Host": "127.0.0.1.nip.io"}),
    refused(403, "cross-site", headers={**CONTROL_HEADERS, "Sec-Fetch-Site": "cross-site"}),
    refused(403, "Content-Type", headers={guards.REQUEST_HEADER: "1", "Content-Type": "application/x-www-form-urlencoded"},
            raw=b"run=live&command=checkpoint"),
    refused(403, "Content-Type", headers={guards.REQUEST_HEADER: "1", "Content-Type": "text/plain"},
            raw=b'{"run": "live", "command": "checkpoint"}'),
    refused(403, "Content-Type", headers={guards.REQUEST_HEADER: "1", "Content-Type": "multipart/form-data; boundary=x"},
            raw=b"--x--"),
    refused(403, "missing header", headers={"Content-Type": "application/json"}),
    refused(403, "missing header", headers={guards.REQUEST_HEADER: "0", "Content-Type": "application/json"}),
    refused(400, "unknown command", body={"run": "live", "command": "rm -rf"}),
    refused(400, "unknown command", body={"run": "live"}),
    refused(400, "not valid JSON", raw=b"run=live&command=stop"),
    refused(400, "not valid JSON", raw=b"\xff\xfe"),
    refused(400, "JSON object", body=["live", "stop"]),
    refused(400, "missing parameter 'run'", body={"command": "stop"}),
    refused(400, "invalid run name", body={"run": "../live", "command": "stop"}),
    refused(400, "must be a string", body={"run": ["live"], "command": "stop"}),
    refused(413, "over 4096 bytes", body={"run": "live", "command": "stop", "pad": "x" * 5000}),
    refused(405, "not allowed", method="GET"),
    refused(405, "not allowed", method="PUT"),
])
def test_hostile_control_requests_write_nothing(live, status, fragment, body, headers, raw, method):
    client = make_app(live)
    rd = RunDir(live / "live")
    before = rd.control_size()
    if method == "POST":
        r = post_control(client, body, headers=headers, raw=raw)
    else:
        r = client.open(PREFIX + "/control", method=method, headers=CONTROL_HEADERS, data=b'{"run":"live","command":"stop"}')
    assert r.status_code == status, r.get_data(as_text=True)
    assert fragment in r.get_json()["error"]
    assert rd.control_size() == before, "a refused request reached control.jsonl"


def test_read_only_mode_refuses_control(live):
    client = make_app(live, "--tbhealth_read_only")
    rd = RunDir(live / "live")
    before = rd.control_size()
    r = post_control(client, GOOD)
    assert r.status_code == 403 and "read_only" in r.get_json()["error"]
    assert rd.control_size() == before
    with pytest.raises(api.ApiError) as e:
        api.control_impl(str(live), GOOD, read_only=True)
    assert e.value.status == 403


@pytest.mark.parametrize("headers", [
    CONTROL_HEADERS,
    {**CONTROL_HEADERS, "Origin": f"http://{HOST}"},
    {**CONTROL_HEADERS, "Host": "127.0.0.1:6006", "Origin": "http://127.0.0.1:6006"},
    {**CONTROL_HEADERS, "Host": "[::1]:6006", "Origin": "http://[::1]:6006"},
    {**CONTROL_HEADERS, "Content-Type": "application/json; charset=utf-8", "Sec-Fetch-Site": "same-origin"},
])
def test_well_formed_requests_are_accepted(live, headers):
    """The counterpart of the refusals: the same live run takes a proper request (one line written)."""
    client = make_app(live)
    rd = RunDir(live / "live")
    before = rd.control_size()
    r = post_control(client, {"run": "live", "command": "pause"}, headers=headers)  # paused: acked 'rejected', harmless
    assert r.status_code == 200, r.get_data(as_text=True)
    assert rd.control_size() > before


def test_get_routes_refuse_foreign_hosts(logdir):
    client = make_app(logdir)
    for route in ("/runs", "/status?run=r1", "/checkpoint?run=r1&name=last.pt", "/logs?run=r1", "/events?run=r1",
                  "/layers?run=r1", "/config?run=r1", "/config"):
        r = client.get(PREFIX + route, headers={"Host": "evil.example:6006"})
        assert r.status_code == 403, route
    assert client.get(PREFIX + "/runs", headers={"Host": "10.1.2.3:6006"}).status_code == 200


def test_allowed_hosts_flag_admits_a_proxy_name(logdir):
    client = make_app(logdir, "--tbhealth_allowed_hosts", "tb.lab.example, other")
    assert client.get(PREFIX + "/runs", headers={"Host": "tb.lab.example"}).status_code == 200
    assert client.get(PREFIX + "/runs", headers={"Host": "evil.example"}).status_code == 403


# --------------------------------------------------------------------------- the guards, as pure functions


@pytest.mark.parametrize("host, ok", [
    ("localhost:6006", True), ("LOCALHOST:6006", True), ("127.0.0.1", True), ("[::1]:6006", True),
    ("10.0.0.5:6006", True), ("[fe80::1]:6006", True),
    ("evil.example", False), ("localhost.evil.example", False), ("127.0.0.1.nip.io:6006", False),
    ("", False), (None, False), ("localhost:abc", False), ("[::1", False),
])
def test_check_host(host, ok):
    assert (guards.check_host(host, guards.allowed_hosts(None, False)) is None) is ok


def test_allowed_hosts_follow_the_bind_flags():
    assert "tb.example" in guards.allowed_hosts("tb.example", False)
    assert "0.0.0.0" not in guards.allowed_hosts("0.0.0.0", False)
    import socket

    assert socket.gethostname().lower() in guards.allowed_hosts(None, True)
    assert socket.gethostname().lower() not in guards.allowed_hosts(None, False) or socket.gethostname() == "localhost"


@pytest.mark.parametrize("origin, host, ok", [
    (None, "localhost:6006", True),
    ("http://localhost:6006", "localhost:6006", True),
    ("http://localhost", "localhost:80", True),
    ("http://localhost:80", "localhost", True),
    ("https://tb.example", "tb.example", True),  # behind a TLS-terminating proxy
    ("https://tb.example", "tb.example:443", True),
    ("http://localhost:6006", "localhost", False),
    ("http://localhost:6007", "localhost:6006", False),
    ("http://127.0.0.1:6006", "localhost:6006", False),
    ("http://evil.example:6006", "localhost:6006", False),
    ("null", "localhost:6006", False),
    ("file://", "localhost:6006", False),
    ("http://localhost:99999", "localhost:6006", False),
])
def test_check_origin(origin, host, ok):
    assert (guards.check_origin(origin, host) is None) is ok

"""The Health tab's routes on run directories written by real trainings.

Each route is checked twice where it matters: through its pure ``*_impl`` function and through
TensorBoard's own WSGI application (data loaded from the same logdir), as the browser sees it.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time

import pytest

from tbhealth.run.rundir import RunDir
from tbhealth_plugin import api, scalars
from tbhealth_plugin.plugin import HealthLoader, HealthPlugin
from tests.plugin_helpers import (
    PREFIX, end_live, finished_runs, make_app, post_control, start_live, wait_for,
    wait_for_state,
)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return finished_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def client(logdir):
    return make_app(logdir)


def get(client, route, **params):
    return client.get(PREFIX + route, query_string=params)


# --------------------------------------------------------------------------- loading


def test_plugin_module_imports_no_torch():
    code = "import sys, tbhealth_plugin.plugin; assert 'torch' not in sys.modules, 'plugin imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_broken_install_hides_the_tab_instead_of_stopping_tensorboard():
    code = (
        "import sys; sys.modules['tbhealth.run.rundir'] = None\n"  # importing it now raises ImportError
        "import tbhealth_plugin.plugin as p\n"
        "from tensorboard.plugins import base_plugin\n"
        "assert p.IMPORT_ERROR is not None\n"
        "assert p.HealthLoader().load(base_plugin.TBContext(logdir='.')) is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Health tab disabled" in proc.stderr


def test_loader_defines_flags_and_survives_a_broken_context():
    import argparse

    parser = argparse.ArgumentParser()
    HealthLoader().define_flags(parser)
    flags = parser.parse_args(["--tbhealth_read_only", "--tbhealth_allowed_hosts", "box.lan"])
    assert flags.tbhealth_read_only and flags.tbhealth_allowed_hosts == "box.lan"
    assert parser.parse_args([]).tbhealth_read_only is False

    class BrokenContext:  # a context whose flags blow up when read
        logdir = "/nonexistent"

        @property
        def flags(self):
            raise RuntimeError("boom")

    assert HealthLoader().load(BrokenContext()) is None  # TensorBoard starts without the tab


def test_plugins_listing_shows_the_health_tab(client):
    listing = client.get("/data/plugins_listing").get_json()
    entry = listing["tbhealth"]
    assert entry["enabled"] is True and entry["tab_name"] == "Health"
    assert entry["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/tbhealth/index.js"}


def test_is_active_only_with_tbhealth_runs(logdir, tmp_path):
    from tensorboard.plugins import base_plugin

    assert HealthPlugin(base_plugin.TBContext(logdir=str(logdir))).is_active() is True
    assert HealthPlugin(base_plugin.TBContext(logdir=str(tmp_path))).is_active() is False
    assert HealthPlugin(base_plugin.TBContext(logdir=None)).is_active() is False


# --------------------------------------------------------------------------- runs and status


def test_runs_lists_both_finished_runs_newest_first(logdir, client):
    data = api.runs_impl(str(logdir))
    names = [r["run"] for r in data["runs"]]
    assert names.index("r2") < names.index("r1")  # r2 started later
    r1 = next(r for r in data["runs"] if r["run"] == "r1")
    status = RunDir(logdir / "r1").read_status()
    assert r1["state"] == "completed" and r1["epoch"] == 3 and r1["total_epochs"] == 3
    assert r1["progress"] == 1.0
    assert r1["val_loss"] == pytest.approx(status["metrics"]["val_loss"]["value"])
    assert r1["val_acc"] == pytest.approx(status["metrics"]["val_acc"]["value"])
    for key in ("eta_s", "alerts_active", "health_score", "updated_at"):
        assert key in r1
    r2 = next(r for r in data["runs"] if r["run"] == "r2")
    assert r2["alerts_active"] == status_of(logdir, "r2")["alerts_active"]
    assert get(client, "/runs").get_json()["runs"] == json.loads(json.dumps(data["runs"]))


def status_of(logdir, name):
    return RunDir(logdir / name).read_status()


def test_status_is_the_status_file_with_run_name_and_server_clock(logdir, client):
    s = api.status_impl(str(logdir), "r1")
    assert s["run"] == "r1" and s["state"] == "completed" and s["epoch"] == s["total_epochs"] == 3
    assert set(s["metrics"]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr"}
    assert s["progress"] == 1.0 and abs(s["server_time"] - time.time()) < 5
    assert "v" not in s
    r = get(client, "/status", run="r1")
    assert r.status_code == 200 and r.get_json()["global_step"] == s["global_step"]


@pytest.mark.parametrize("params, code", [
    ({}, 400), ({"run": ""}, 400), ({"run": "nope"}, 404), ({"run": "../r1"}, 400),
])
def test_status_errors_are_json_4xx(client, params, code):
    r = get(client, "/status", **params)
    assert r.status_code == code and r.get_json()["error"]


# --------------------------------------------------------------------------- alerts and logs


def test_alerts_come_in_the_design_shape_and_then_only_as_deltas(logdir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(logdir / "r2", run / "r2")  # a real run's files, changed below like a trainer would
    first = api.alerts_impl(str(run), "r2", 0)
    assert first["alerts"], "a learning rate of 5 should have raised alerts"
    for a in first["alerts"]:
        assert list(a)[:11] == ["id", "rule", "severity", "message", "epoch", "step", "time", "layer", "value",
                                "threshold", "resolved"]
    assert api.alerts_impl(str(run), "r2", first["cursor"]) == {"alerts": [], "cursor": first["cursor"]}
    target = next((a for a in first["alerts"] if not a["resolved"]), first["alerts"][0])
    RunDir(run / "r2").append_alert({"id": target["id"], "resolved": True, "time": time.time()})
    delta = api.alerts_impl(str(run), "r2", first["cursor"])
    assert [a["id"] for a in delta["alerts"]] == [target["id"]]
    assert delta["alerts"][0]["resolved"] is True and delta["alerts"][0]["message"] == target["message"]
    assert delta["cursor"] > first["cursor"]
    assert api.alerts_impl(str(run), "r2", 10**9)["alerts"], "a cursor past the end starts over"


def test_logs_come_once_from_an_offset(logdir, client):
    first = api.logs_impl(str(logdir), "r1", 0)
    messages = [r["message"] for r in first["records"]]
    assert any("Epoch 3/3 done" in m for m in messages), messages
    assert all({"time", "level", "message"} <= set(r) for r in first["records"])
    assert api.logs_impl(str(logdir), "r1", first["offset"]) == {"records": [], "offset": first["offset"], "skipped": 0}
    via_http = get(client, "/logs", run="r1", offset=0).get_json()
    assert via_http["offset"] == first["offset"] and len(via_http["records"]) == len(first["records"])
    assert get(client, "/logs", run="r1", offset="abc").status_code == 400
    assert get(client, "/logs", run="r1", offset="-1").status_code == 400


# --------------------------------------------------------------------------- scalars


@pytest.mark.parametrize("values, expected", [
    ([0.1, 0.1, 0.05], [(3, "Epoch 3: LR reduced to 0.05")]),
    ([0.001, 0.001, 0.0005, 0.0005, 0.00025], [(3, "Epoch 3: LR reduced to 0.0005"), (5, "Epoch 5: LR reduced to 0.00025")]),
    ([0.0001, 0.0005, 0.001], []),                       # warm-up is not a reduction
    ([0.01, None, 0.01, 0.001], [(4, "Epoch 4: LR reduced to 0.001")]),  # a gap is skipped
    ([0.003, 0.003 * (1 - 1e-9)], []),                   # float noise
    ([0.01, float("nan"), 0.005], [(3, "Epoch 3: LR reduced to 0.005")]),
    ([1e-4, 5e-5], [(2, "Epoch 2: LR reduced to 0.00005")]),
])
def test_lr_reductions(values, expected):
    steps = list(range(1, len(values) + 1))
    got = scalars.lr_reductions(steps, values)
    assert [(r["epoch"], r["label"]) for r in got] == expected
    for r in got:
        assert r["to"] < r["from"]


def test_scalars_series_and_lr_reductions_from_tensorboard(client):
    r = get(client, "/scalars", run="r1")
    assert r.status_code == 200
    data = r.get_json()
    series = data["series"]
    for tag in scalars.KEY_TAGS:
        assert series[tag]["steps"] == [1, 2, 3], tag
    assert "step/loss" in series and len(series["step/loss"]["values"]) > 3
    assert [x["label"] for x in data["lr_reductions"]] == ["Epoch 2: LR reduced to 0.0009", "Epoch 3: LR reduced to 0.00027"]
    assert list(series)[:5] == list(scalars.KEY_TAGS)


@pytest.mark.parametrize("tags, expected", [
    ("train/*", {"train/loss", "train/acc"}),
    ("val/loss,lr", {"val/loss", "lr"}),
    ("step/*", {"step/loss", "step/grad_norm", "step/lr"}),
    ("nothing/*", set()),
])
def test_scalars_tag_filter_keeps_lr_reductions(client, tags, expected):
    data = get(client, "/scalars", run="r1", tags=tags).get_json()
    assert set(data["series"]) == expected
    assert len(data["lr_reductions"]) == 2  # computed from lr even when lr is not sent


def test_scalars_tag_filter_is_bounded(client):
    assert get(client, "/scalars", run="r1", tags=",".join(["x"] * 65)).status_code == 400


def test_scalars_of_an_unknown_run_is_404(client):
    assert get(client, "/scalars", run="nope").status_code == 404


# --------------------------------------------------------------------------- checkpoints and control


def test_checkpoint_download_streams_the_file(logdir, client):
    path = RunDir(logdir / "r1").checkpoint_file("last.pt")
    r = get(client, "/checkpoint", run="r1", name="last.pt")
    assert r.status_code == 200 and r.get_data() == path.read_bytes()
    assert r.headers["Content-Disposition"] == 'attachment; filename="last.pt"'
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert get(client, "/checkpoint", run="r1", name="nope.pt").status_code == 404
    assert get(client, "/checkpoint", run="r1").status_code == 400


def test_control_of_a_finished_run_is_409_and_writes_nothing(logdir, client):
    rd = RunDir(logdir / "r1")
    before = rd.control_size()
    r = post_control(client, {"run": "r1", "command": "pause"})
    assert r.status_code == 409 and "completed" in r.get_json()["error"]
    assert rd.control_size() == before
    with pytest.raises(api.ApiError) as e:
        api.control_impl(str(logdir), {"run": "r1", "command": "stop"}, read_only=False)
    assert e.value.status == 409


def test_ack_of_unknown_or_malformed_ids(client):
    assert get(client, "/ack", run="r1", id="0123456789ab").status_code == 404
    assert get(client, "/ack", run="r1", id="../../x").status_code == 400


@pytest.mark.slow
def test_control_round_trip_on_a_live_training(tmp_path):
    """pause -> paused; checkpoint -> downloadable file; resume; stop -> the trainer exits."""
    proc = start_live(tmp_path, "live")
    try:
        client = make_app(tmp_path)

        def send(command):
            r = post_control(client, {"run": "live", "command": command})
            assert r.status_code == 200, r.get_data(as_text=True)
            rid = r.get_json()["id"]
            return wait_for(lambda: (lambda a: a if a["status"] != "pending" else None)(
                get(client, "/ack", run="live", id=rid).get_json()), 60, f"ack of {command}")

        ack = send("pause")
        assert ack["status"] == "done", ack
        assert wait_for_state(tmp_path, "live", ("paused",), 15)["state"] == "paused"
        assert get(client, "/status", run="live").get_json()["state"] == "paused"
        ack = send("checkpoint")
        assert ack["status"] == "done" and ack["checkpoint"].endswith(".pt"), ack
        download = get(client, "/checkpoint", run="live", name=ack["checkpoint"])
        assert download.status_code == 200 and len(download.get_data()) > 1000
        assert send("resume")["status"] == "done"
        wait_for_state(tmp_path, "live", ("training",), 15)
        assert send("stop")["status"] == "done"
        assert proc.wait(60) == 0
        assert wait_for_state(tmp_path, "live", ("stopped",), 15)["state"] == "stopped"
        assert post_control(client, {"run": "live", "command": "pause"}).status_code == 409
    finally:
        end_live(proc, tmp_path, "live")


# --------------------------------------------------------------------------- frontend files


@pytest.mark.parametrize("name, kind", [
    ("index.js", "text/javascript"), ("model.js", "text/javascript"), ("views.js", "text/javascript"),
    ("runpage.js", "text/javascript"), ("charts.js", "text/javascript"), ("style.css", "text/css"),
])
def test_static_files_are_served(client, name, kind):
    r = client.get(f"{PREFIX}/{name}")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(kind)
    assert len(r.get_data()) > 500


def test_index_exports_render(client):
    assert "export async function render()" in client.get(f"{PREFIX}/index.js").get_data(as_text=True)


def test_plotly_is_served_gzipped_and_plain(client):
    zipped = client.get(f"{PREFIX}/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(zipped.get_data())
    assert b"window.Plotly" in text and len(text) > 1_000_000
    plain = client.get(f"{PREFIX}/plotly.min.js")
    assert plain.status_code == 200 and plain.get_data() == text


def test_config_reports_read_only(logdir):
    assert make_app(logdir).get(PREFIX + "/config").get_json()["read_only"] is False
    assert make_app(logdir, "--tbhealth_read_only").get(PREFIX + "/config").get_json()["read_only"] is True


@pytest.mark.parametrize("route", ["/runs", "/status", "/alerts", "/logs", "/scalars", "/checkpoint", "/ack", "/config",
                                   "/events", "/layers"])
@pytest.mark.parametrize("params", [
    {"run": "r1", "after": "1e9", "offset": "0x10", "id": "", "name": ""},
    {"run": "\u2603", "offset": "\u00b2"},
    {"run": "r1/../../..", "after": "99999999999999999999"},
    {"run": "r1", "metrics": "grad_norm,\u2603"},
])
def test_bad_input_is_never_a_500(client, route, params):
    r = get(client, route, **params)
    assert r.status_code < 500, (route, params, r.get_data(as_text=True))
    if r.status_code >= 400:
        assert r.get_json()["error"]

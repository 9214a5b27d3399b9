"""The routes behind the Health tab's events, per-layer view and settings: GET events, GET layers
and GET config, through their pure functions (literal records and real run files) and through
TensorBoard's own WSGI application over real trainings."""

from __future__ import annotations

import shutil

import pytest

from tbhealth.health.settings import HealthConfig
from tbhealth.run.rundir import RunDir
from tbhealth.run.states import FINAL_STATES, LIVE_STATES
from tbhealth.run.status import METRIC_KEYS
from tbhealth_plugin import config, events, layers, scalars
from tests.plugin_helpers import PREFIX, finished_runs, make_app, tab_runs


#: Tests on real trainings (the shared runs take ~30 s to train once per session).
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return tab_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def client(logdir):
    return make_app(logdir)


def get(client, route, **params):
    return client.get(PREFIX + route, query_string=params)


# --------------------------------------------------------------------------- placing events


def test_clock_places_by_epoch_size_else_by_time():
    clock = events.RunClock(step_points=[(10, 100.0), (20, 200.0)], epoch_ends=[(1, 150.0), (2, 250.0)],
                            batches_per_epoch=15, started_at=50.0)
    assert clock.step_at(150.0) == 15 and clock.step_at(0.0) == 10 and clock.step_at(999.0) == 20
    assert clock.epoch_x(30, None) == 2.0 and clock.epoch_at(31, None) == 3
    untimed = events.RunClock(epoch_ends=[(1, 150.0), (2, 250.0)], started_at=50.0)
    assert untimed.epoch_x(None, 100.0) == pytest.approx(0.5)  # half-way through epoch 1
    assert untimed.epoch_x(None, 200.0) == pytest.approx(1.5)
    assert untimed.epoch_x(None, 300.0) == pytest.approx(2.5)  # in epoch 3, at the mean pace
    assert untimed.epoch_at(None, 200.0) == 2
    assert events.RunClock().place({"time": 5.0, "step": None, "epoch": 4}) == {
        "time": 5.0, "step": None, "epoch": 4, "epoch_x": 4.0}


def test_lr_events_mark_every_change_at_the_boundary_before_it():
    got = events.lr_events([1, 2, 3, 4, 5], [0.1, 0.1, 0.05, None, 0.1], [10.0, 20.0, 30.0, 40.0, 50.0])
    assert got == [{"kind": "lr", "time": 20.0, "step": None, "epoch": 3, "from": 0.1, "to": 0.05},
                   {"kind": "lr", "time": 30.0, "step": None, "epoch": 5, "from": 0.05, "to": 0.1}]
    assert events.lr_events([1, 2], [0.003, 0.003 * (1 + 1e-9)], [1.0, 2.0]) == []  # float noise


def test_alert_events_fire_once_and_resolve_when_the_record_says_so():
    records = [
        {"id": "a", "rule": "divergence", "severity": "critical", "message": "m1", "epoch": 1, "step": 5, "time": 10.0},
        {"id": "a", "rule": "divergence", "severity": "critical", "message": "m2", "epoch": 1, "step": 5, "time": 10.0},
        {"id": "b", "rule": "dead_neurons", "severity": "warning", "message": "d", "epoch": 2, "step": 30, "time": 20.0,
         "layer": "act1", "layers": [{"layer": "act1", "value": 0.9}, {"layer": "act2", "value": 0.6}]},
        {"id": "a", "resolved": True, "message": "m2"},
        {"_malformed": "{"},
        {"id": "b", "resolved": True, "resolved_time": 40.0, "resolved_step": 60, "resolved_epoch": 3},
    ]
    got = events.alert_events(records, {"m2": [33.0]})
    assert [(e["id"], e["fired"], e["resolved"], e["time"], e["step"]) for e in got] == [
        ("a", True, False, 10.0, 5), ("b", True, False, 20.0, 30), ("a", False, True, 33.0, None), ("b", False, True, 40.0, 60)]
    assert got[1]["layers"][1] == {"layer": "act2", "value": 0.6} and got[3]["epoch"] == 3
    assert got[2]["rule"] == "divergence" and got[2]["severity"] == "critical"


def test_control_events_carry_the_outcome():
    requests = [{"id": "r1", "command": "pause", "source": "tensorboard", "time": 1.0},
                {"id": "r2", "command": "checkpoint", "source": "cli", "time": 2.0},
                {"id": "r3", "command": "stop", "source": "cli", "time": 3.0}, {"_malformed": "x"}]
    acks = {"r1": {"id": "r1", "status": "done", "detail": "paused", "time": 1.5, "step": 40},
            "r2": {"id": "r2", "status": "done", "time": 2.5, "step": 41, "checkpoint": "/x/checkpoints/manual.pt"}}
    got = events.control_events(requests, acks)
    assert [(e["command"], e["status"], e["time"], e["step"]) for e in got] == [
        ("pause", "done", 1.5, 40), ("checkpoint", "done", 2.5, 41), ("stop", "pending", 3.0, None)]
    assert got[1]["checkpoint"] == "manual.pt" and got[0]["source"] == "tensorboard"


# --------------------------------------------------------------------------- GET events on real runs


@slow
def test_events_of_a_steered_run_hold_every_kind(logdir, client):
    data = get(client, "/events", run="eventful").get_json()
    kinds = {e["kind"] for e in data["events"]}
    assert kinds == set(events.EVENT_KINDS), kinds
    for e in data["events"]:
        assert {"kind", "step", "epoch", "time", "epoch_x"} <= set(e), e
    control = [e for e in data["events"] if e["kind"] == "control"]
    assert [e["command"] for e in control] == ["pause", "resume", "checkpoint", "stop"]
    assert all(e["status"] == "done" and e["source"] == "test" and isinstance(e["step"], int) for e in control)
    status = RunDir(logdir / "eventful").read_status()
    per = status["batches_per_epoch"]
    pause = control[0]
    assert pause["epoch"] >= 3 and pause["epoch_x"] == pytest.approx(pause["step"] / per)
    lr = [e for e in data["events"] if e["kind"] == "lr"]
    assert lr and all(e["to"] == pytest.approx(e["from"] * 0.5) for e in lr)
    assert lr[0]["epoch"] == 3 and lr[0]["step"] == 2 * per  # the rate halves after epoch 2
    alerts = [e for e in data["events"] if e["kind"] == "alert"]
    assert alerts and all(e["rule"] and e["severity"] and e["fired"] != e["resolved"] for e in alerts)
    times = [e["time"] for e in data["events"] if e["time"] is not None]
    assert times == sorted(times)


@slow
def test_resolved_alerts_are_placed_where_they_cleared(logdir):
    records = {a["id"]: a for a in RunDir(logdir / "eventful").read_alerts() if a["resolved"]}
    resolved = [e for e in events_of(logdir, "eventful") if e["kind"] == "alert" and e["resolved"]]
    assert records and len(resolved) == len(records), "the LR of 0.5 explodes the gradients for a while"
    for e in resolved:
        record = records[e["id"]]
        assert (e["time"], e["step"]) == (record["resolved_time"], record["resolved_step"])
        assert e["step"] > record["step"] and e["epoch_x"] is not None


def events_of(logdir, run):
    return make_app(logdir).get(PREFIX + "/events", query_string={"run": run}).get_json()["events"]


@slow
def test_events_errors(client):
    assert get(client, "/events").status_code == 400
    assert get(client, "/events", run="nope").status_code == 404
    assert get(client, "/events", run="../x").status_code == 400


# --------------------------------------------------------------------------- GET layers


@pytest.mark.parametrize("names, known, expected", [
    (["fc10", "fc2", "fc1"], None, ["fc1", "fc2", "fc10"]),
    (["layers.10.mlp", "layers.2.mlp", "embed"], None, ["embed", "layers.2.mlp", "layers.10.mlp"]),
    (["fc1", "norm1", "fc2", "out"], ["fc1", "norm1", "act1", "fc2", "out"], ["fc1", "norm1", "fc2", "out"]),
    (["decoder", "encoder", "extra"], ["encoder", "decoder"], ["encoder", "decoder", "extra"]),
])
def test_model_order(names, known, expected):
    assert layers.model_order(names, known) == expected


def test_grid_aligns_and_bins():
    rows = [{"steps": [10, 20, 30], "values": [1.0, 2.0, 3.0]}, {"steps": [10, 30], "values": [4.0, 6.0]}]
    assert layers.grid(rows) == ([10, 20, 30], [[1.0, 2.0, 3.0], [4.0, None, 6.0]])
    long = [{"steps": list(range(1, 1001)), "values": [float(s) for s in range(1, 1001)]}]
    steps, values = layers.grid(long, columns=10)
    assert len(steps) == 10 and steps[-1] == 1000 and values[0][-1] == 1000.0  # the last reading of each range
    assert steps == [int(v) for v in values[0]]


@slow
def test_layers_of_a_deep_sigmoid_net(logdir, client):
    data = get(client, "/layers", run="vanishing20").get_json()
    assert data["order"] == "model"  # the run wrote its measured layers in model order at start
    assert RunDir(logdir / "vanishing20").read_layers()[:4] == ["fc1", "act1", "fc2", "act2"]
    grad = data["metrics"]["grad_norm"]
    assert grad["layers"] == [f"fc{i}" for i in range(1, 21)] + ["out"]  # fc2 before fc10; no "global"
    assert len(grad["values"]) == len(grad["layers"]) and all(len(r) == len(grad["steps"]) for r in grad["values"])
    first, last = grad["values"][0], grad["values"][-1]
    assert max(v for v in first if v is not None) < 1e-7 < min(v for v in last if v is not None)  # vanishing at the input
    dead = data["metrics"]["dead_units"]
    assert dead["layers"][:3] == ["act1", "act2", "act3"] and all(0 <= v <= 1 for r in dead["values"] for v in r if v is not None)
    only = get(client, "/layers", run="vanishing20", metrics="dead_units").get_json()
    assert list(only["metrics"]) == ["dead_units"]
    assert get(client, "/layers", run="vanishing20", metrics="nope").status_code == 400


@slow
def test_layers_follow_the_order_the_run_recorded(logdir, tmp_path):
    shutil.copytree(logdir / "steplr", tmp_path / "steplr")
    RunDir(tmp_path / "steplr").write_layers(["fc1", "norm1", "act1", "fc2", "norm2", "act2", "out"])
    data = make_app(tmp_path).get(PREFIX + "/layers", query_string={"run": "steplr"}).get_json()
    assert data["order"] == "model"
    assert data["metrics"]["grad_norm"]["layers"] == ["fc1", "norm1", "fc2", "norm2", "out"]
    assert RunDir(tmp_path / "steplr").read_layers()[:2] == ["fc1", "norm1"]


# --------------------------------------------------------------------------- GET config


@slow
def test_config_serves_the_vocabularies_python_defines(client):
    c = get(client, "/config").get_json()
    assert set(c["states"]["live"]) == LIVE_STATES and set(c["states"]["final"]) == FINAL_STATES
    assert "unresponsive" in c["states"]["all"] and "stopping" in c["states"]["running"]
    assert c["metric_keys"] == list(METRIC_KEYS)
    assert c["severities"][0] == "critical"
    assert "health" not in c


@slow
def test_config_of_a_run_without_settings_uses_the_defaults(logdir, tmp_path):
    shutil.copytree(logdir / "steplr", tmp_path / "steplr")
    RunDir(tmp_path / "steplr").health_settings_path.unlink(missing_ok=True)  # a run from before the file existed
    c = make_app(tmp_path).get(PREFIX + "/config", query_string={"run": "steplr"}).get_json()
    assert c["health_source"] == "defaults" and c["run"] == "steplr"
    defaults = HealthConfig()
    assert c["thresholds"]["acc_gap_points"] == pytest.approx(defaults.overfitting.acc_gap * 100)
    assert c["thresholds"]["gpu_memory_critical"] == defaults.memory.max_fraction
    assert c["thresholds"]["gpu_memory_warning"] == pytest.approx(defaults.memory.max_fraction - config.GPU_WARNING_MARGIN)


@slow
def test_config_thresholds_follow_the_run_own_settings(logdir, tmp_path):
    shutil.copytree(logdir / "steplr", tmp_path / "steplr")
    settings = HealthConfig.model_validate({"overfitting": {"acc_gap": 0.05}, "memory": {"max_fraction": 0.8},
                                            "plateau": {"min_delta": 0.01}})
    RunDir(tmp_path / "steplr").write_health_settings(settings.model_dump())
    c = config.config_impl(str(tmp_path), "steplr", read_only=False, reload_interval=5)
    assert c["health_source"] == "run"
    assert c["thresholds"] == {"acc_gap_points": 5.0, "gpu_memory_critical": 0.8, "gpu_memory_warning": pytest.approx(0.7),
                               "flat_change": 0.01, "vanishing_grad_norm": 1e-7, "dead_fraction": 0.5}
    RunDir(tmp_path / "steplr").write_health_settings({"overfitting": {"acc_gap": 50}})  # not a fraction: refused
    assert config.config_impl(str(tmp_path), "steplr", read_only=False, reload_interval=5)["health_source"] == "defaults"


@slow
def test_config_of_an_unknown_run_is_404(client):
    assert get(client, "/config", run="nope").status_code == 404
    assert get(client, "/config", run="").status_code == 400


# --------------------------------------------------------------------------- LR labels


@pytest.mark.parametrize("value, text", [
    (0.003, "0.003"), (5e-5, "0.00005"), (1e-6, "0.000001"), (1.8e-19, "1.8e-19"), (1.23456e-7, "1.23e-7"), (12.5, "12.5"),
])
def test_lr_labels_keep_their_significant_digits(value, text):
    assert scalars.format_lr(value) == text


@slow
def test_lr_reductions_of_a_long_step_schedule(tmp_path_factory):
    data = make_app(tab_runs(tmp_path_factory)).get(PREFIX + "/scalars", query_string={"run": "steplr"}).get_json()
    labels = [r["label"] for r in data["lr_reductions"]]
    assert len(labels) == 33 and labels[-1].endswith("e-21") and not any(label.endswith(" 0") for label in labels)


@slow
def test_finished_runs_fixture_still_has_its_two_reductions(tmp_path_factory):
    data = make_app(finished_runs(tmp_path_factory)).get(PREFIX + "/events", query_string={"run": "r1"}).get_json()
    assert [(e["epoch"], e["kind"]) for e in data["events"] if e["kind"] == "lr"] == [(2, "lr"), (3, "lr")]

"""`tbhealth status|alerts|runs` against run directories written through tbhealth.run, as a trainer does."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tbhealth.run.files import write_json_atomic, write_text_atomic

from tbhealth.run.states import STALE_AFTER_S
from tbhealth.run.rundir import RunDir
from tbhealth.run.status import progress_fraction
from tbhealth.run.schema import SchemaError, validate_alert, validate_run_summary, validate_status
from tbhealth.monitor.system import sample_once
from tbhealth_cli import show as inspect_cli
from tbhealth_cli import render
from tbhealth_cli.app import app

runner = CliRunner()
TBHEALTH = shutil.which("tbhealth") or str(Path(sys.executable).with_name("tbhealth"))


@pytest.fixture(scope="module")
def system_reading() -> dict:
    return sample_once(window=0.05)


def metric(value, delta=None):
    return {"value": value, "delta": delta}


def status_doc(run: str, system: dict | None, **overrides) -> dict:
    """A status in the documented shape, as the trainer writes it (``updated_at`` added on write)."""
    doc = {
        "run": run, "state": "training", "epoch": 3, "total_epochs": 10, "batch": 40, "batches_per_epoch": 100,
        "global_step": 240, "elapsed_s": 125.0, "eta_s": 65.0, "started_at": time.time() - 125,
        "metrics": {
            "train_loss": metric(0.41, -0.023), "train_acc": metric(0.87, 0.012),
            "val_loss": metric(0.52, 0.03), "val_acc": metric(0.83, 0.0), "lr": metric(1e-3, None),
        },
        "system": system, "alerts_active": 1, "health_score": 85,
        "interventions": {"pauses": 1, "stops": 0, "checkpoints": 2},
    }
    doc.update(overrides)
    return doc


def write_run(logdir: Path, name: str, system: dict | None, **overrides) -> RunDir:
    rd = RunDir(logdir / name)
    rd.write_status(status_doc(name, system, **overrides))
    rd.append_log("INFO", f"run {name} started")
    return rd


def write_stale(rd: RunDir, doc: dict, age_s: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat written ``age_s`` ago: what a trainer killed with -9 leaves behind."""
    then = time.time() - age_s
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: then)
        rd.write_status(doc)


@pytest.fixture(autouse=True)
def fixed_width_console(monkeypatch):
    """The commands' console at 100 columns: Rich would size it to the terminal pytest runs in.

    (The subprocess tests below keep the real console, sized by COLUMNS.)
    """
    monkeypatch.setattr(inspect_cli, "console", Console(width=100, highlight=False))


def invoke(*args: str, env: dict | None = None):
    result = runner.invoke(app, list(args), env=env)
    # A user mistake ends in typer.Exit (SystemExit), never in an exception escaping the command.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def render_text(renderable, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.file.getvalue()


# --------------------------------------------------------------------------- status


def test_status_json_has_the_documented_shape(tmp_path, system_reading):
    write_run(tmp_path, "mnist", system_reading)
    result = invoke("status", "mnist", "--logdir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    validate_status(data)
    assert data["run"] == "mnist" and data["state"] == "training"
    assert (data["epoch"], data["total_epochs"], data["batch"], data["batches_per_epoch"]) == (3, 10, 40, 100)
    assert data["metrics"]["val_loss"] == {"value": 0.52, "delta": 0.03}
    assert data["system"] == system_reading
    assert "v" not in data  # the file's format version is not part of the command's output
    assert abs(data["updated_at"] - time.time()) < 60


def test_status_json_from_a_real_process_by_path(tmp_path, system_reading):
    rd = write_run(tmp_path / "exp", "b", system_reading, state="paused")
    out = subprocess.run([TBHEALTH, "status", str(rd.path), "--json"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={**os.environ, "TBHEALTH_LOGDIR": str(tmp_path / "exp")})
    assert out.returncode == 0, out.stderr
    data = validate_status(json.loads(out.stdout))
    assert (data["run"], data["state"]) == ("b", "paused")


@pytest.mark.parametrize("where", [".", "./"])
def test_status_and_alerts_of_the_run_folder_you_are_in(tmp_path, system_reading, monkeypatch, where):
    rd = write_run(tmp_path, "here", system_reading)
    monkeypatch.chdir(rd.path)
    result = invoke("status", where, "--json")
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["run"]).name == "here"  # a path outside the logdir stays a path
    assert invoke("alerts", where).exit_code == 0


def test_status_panel_at_fixed_width(tmp_path, system_reading):
    rd = write_run(tmp_path, "mnist", system_reading)
    rd.append_alert({"id": "a1", "rule": "overfitting", "severity": "warning", "epoch": 3, "step": 240,
                     "time": time.time(), "layer": None, "value": 0.52, "threshold": None, "resolved": False,
                     "message": "val_loss rose 3 epochs in a row while train_loss fell"})
    text = render_text(render.format_status(rd.read_status(), "mnist", rd.read_alerts()), width=100)
    assert "mnist" in text and " TRAINING " in text
    assert "Epoch 3/10 – Batch 40/100" in text
    assert "24%" in text  # (2 epochs + 40/100) of 10
    assert "ETA 1m 05s" in text and "Elapsed 2m 05s" in text
    assert "▼ 0.0230" in text  # train_loss fell
    assert "▲ 3.0 pt" not in text and "▲ 1.2 pt" in text  # train_acc in points
    assert "→ 0.0 pt" in text  # val_acc flat
    assert "Health 85/100 · 1 active alert" in text
    assert "warning overfitting: val_loss rose 3 epochs" in text
    assert "no GPU" in text and "RAM" in text and "Disk read" in text
    assert "1 pause, 0 stops, 2 checkpoints" in text


def test_status_command_prints_plain_text_when_piped(tmp_path, system_reading):
    write_run(tmp_path, "mnist", system_reading)
    out = subprocess.run([TBHEALTH, "status", "mnist", "--logdir", str(tmp_path)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": "90"})
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # no colour codes into a pipe
    assert "TRAINING" in out.stdout and "Epoch 3/10" in out.stdout and "ETA 1m 05s" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 90


def test_stale_heartbeat_reads_unresponsive(tmp_path, system_reading, monkeypatch):
    rd = RunDir(tmp_path / "killed")
    write_stale(rd, status_doc("killed", system_reading), STALE_AFTER_S + 30, monkeypatch)
    result = invoke("status", "killed", "--logdir", str(tmp_path), "--json")
    data = validate_status(json.loads(result.stdout))
    assert (data["state"], data["reported_state"]) == ("unresponsive", "training")
    text = invoke("status", "killed", "--logdir", str(tmp_path)).stdout
    assert "UNRESPONSIVE" in text and "No heartbeat for 40s" in text and "'training'" in text


def test_a_finished_run_never_reads_unresponsive(tmp_path, system_reading, monkeypatch):
    rd = RunDir(tmp_path / "done")
    doc = status_doc("done", system_reading, state="completed", epoch=10, batch=100, eta_s=0.0)
    write_stale(rd, doc, 3600, monkeypatch)
    data = json.loads(invoke("status", "done", "--logdir", str(tmp_path), "--json").stdout)
    assert data["state"] == "completed"
    text = invoke("status", "done", "--logdir", str(tmp_path)).stdout
    assert "COMPLETED" in text and "100%" in text and "ETA" not in text


def test_nan_loss_is_strict_json_and_shown(tmp_path):
    write_run(tmp_path, "div", None, state="failed", message="loss is NaN at step 240",
              metrics={"train_loss": metric(float("nan"), float("inf")), "train_acc": None,
                       "val_loss": None, "val_acc": None, "lr": metric(0.1)})
    result = invoke("status", "div", "--logdir", str(tmp_path), "--json")

    def no_constants(name):
        raise AssertionError(f"bare {name} in JSON output")

    data = json.loads(result.stdout, parse_constant=no_constants)
    validate_status(data)
    assert data["metrics"]["train_loss"] == {"value": "NaN", "delta": "Infinity"}
    text = invoke("status", "div", "--logdir", str(tmp_path)).stdout
    assert "FAILED" in text and "NaN" in text and "loss is NaN at step 240" in text and "no system readings" in text


def test_partial_status_renders_without_a_traceback(tmp_path):
    rd = RunDir(tmp_path / "odd")
    write_json_atomic(rd.status_path, {"state": "training", "updated_at": time.time()})
    result = invoke("status", "odd", "--logdir", str(tmp_path))
    assert result.exit_code == 0
    assert "TRAINING" in result.stdout and "Epoch —/—" in result.stdout
    result = invoke("status", "odd", "--logdir", str(tmp_path), "--json")
    assert json.loads(result.stdout)["state"] == "training"
    with pytest.raises(SchemaError, match="epoch"):
        validate_status(json.loads(result.stdout))


def test_a_mistyped_status_field_is_named_not_a_traceback(tmp_path):
    rd = RunDir(tmp_path / "odd")
    write_json_atomic(rd.status_path, {"state": "training", "updated_at": time.time(), "epoch": "three"})
    result = invoke("status", "odd", "--logdir", str(tmp_path))
    assert result.exit_code == 1
    assert "epoch is 'three', expected a whole number" in " ".join(result.output.split())


def test_missing_status_file_says_what_to_do(tmp_path):
    RunDir(tmp_path / "early").append_log("INFO", "starting")
    result = invoke("status", "early", "--logdir", str(tmp_path))
    assert result.exit_code == 1
    assert "no readable status file yet" in result.stderr and "log.jsonl" in result.stderr


def test_unknown_run_exits_2_with_a_hint(tmp_path, system_reading):
    write_run(tmp_path, "mnist", system_reading)
    result = invoke("status", "nope", "--logdir", str(tmp_path))
    assert result.exit_code == 2
    assert "no run 'nope'" in result.stderr and "mnist" in result.stderr
    out = subprocess.run([TBHEALTH, "alerts", "nope", "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no run 'nope'" in out.stderr and "Traceback" not in out.stderr


def test_a_run_name_that_leaves_the_logdir_is_refused(tmp_path):
    result = invoke("status", "../etc", "--logdir", str(tmp_path))
    assert result.exit_code == 2 and "invalid run name" in result.stderr


# --------------------------------------------------------------------------- alerts


def test_alerts_json_merges_episodes_and_has_the_documented_shape(tmp_path, system_reading):
    rd = write_run(tmp_path, "mnist", system_reading)
    t0 = time.time() - 100
    grad = {"id": "g1", "rule": "vanishing_gradients", "severity": "warning", "epoch": 1, "step": 50, "time": t0,
            "layer": "fc1", "value": 3e-9, "threshold": 1e-7, "resolved": False,
            "message": "fc1: gradient norm 3e-09 < 1e-07", "action": "warn"}
    rd.append_alert(grad)
    rd.append_alert({"id": "d1", "rule": "divergence", "severity": "critical", "epoch": 2, "step": 90,
                     "time": t0 + 50, "layer": None, "value": None, "threshold": None, "resolved": False,
                     "message": "loss is NaN", "action": "stop"})
    rd.append_alert({**grad, "resolved": True, "value": 2e-6})  # the episode ends
    result = invoke("alerts", "mnist", "--logdir", str(tmp_path), "--json")
    alerts = json.loads(result.stdout)
    for a in alerts:
        validate_alert(a)
        assert list(a)[:11] == ["id", "rule", "severity", "message", "epoch", "step", "time", "layer", "value",
                                "threshold", "resolved"]
    assert [(a["id"], a["resolved"]) for a in alerts] == [("g1", True), ("d1", False)]
    assert alerts[0]["value"] == 2e-6 and alerts[0]["layer"] == "fc1" and alerts[1]["layer"] is None


def test_alerts_table(tmp_path, system_reading):
    rd = write_run(tmp_path, "mnist", system_reading)
    rd.append_alert({"id": "m1", "rule": "memory", "severity": "critical", "epoch": 4, "step": 400,
                     "time": time.time(), "layer": None, "value": 0.97, "threshold": 0.95, "resolved": False,
                     "message": "GPU memory 97% > 95% of 80 GiB"})
    rd.append_alert({"id": "d1", "rule": "dead_neurons", "severity": "warning", "epoch": 4, "step": 400,
                     "time": time.time(), "layer": "features[3]", "value": 0.6, "threshold": 0.5, "resolved": True,
                     "message": "60% of [features.3] units output 0"})
    text = invoke("alerts", "mnist", "--logdir", str(tmp_path)).stdout
    assert "features[3]" in text and "60% of [features.3] units output 0" in text  # not eaten as markup
    assert "resolved" in text
    assert "memory" in text and "critical" in text and "GPU memory 97% > 95%" in text and "active" in text
    assert "2 alerts, 1 active." in text
    write_run(tmp_path, "quiet", None)
    assert "No alerts for run 'quiet'." in invoke("alerts", "quiet", "--logdir", str(tmp_path)).stdout
    assert json.loads(invoke("alerts", "quiet", "--logdir", str(tmp_path), "--json").stdout) == []


# --------------------------------------------------------------------------- runs


def test_runs_lists_newest_first(tmp_path, system_reading, monkeypatch):
    now = time.time()
    write_run(tmp_path, "old", system_reading, state="completed", epoch=10, batch=100, started_at=now - 7200)
    write_run(tmp_path, "group/newest", system_reading, started_at=now - 10)
    write_run(tmp_path, "middle", system_reading, state="paused", epoch=1, batch=50, started_at=now - 600,
              metrics={"train_loss": None, "train_acc": None, "val_loss": None, "val_acc": None, "lr": None})
    write_stale(RunDir(tmp_path / "dead"), status_doc("dead", system_reading, started_at=now - 3000), 60, monkeypatch)

    result = invoke("runs", str(tmp_path), "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    for row in rows:
        validate_run_summary(row)
    assert [r["run"] for r in rows] == ["group/newest", "middle", "dead", "old"]
    by_name = {r["run"]: r for r in rows}
    assert by_name["old"]["progress"] == 1.0 and by_name["old"]["state"] == "completed"
    assert by_name["middle"]["progress"] == pytest.approx(0.05) and by_name["middle"]["val_loss"] is None
    assert by_name["dead"]["state"] == "unresponsive"
    assert by_name["group/newest"]["val_acc"] == 0.83 and by_name["group/newest"]["eta_s"] == 65.0

    text = invoke("runs", str(tmp_path)).stdout
    order = [text.index(name) for name in ("group/newest", "middle", "dead", "old")]
    assert order == sorted(order)
    assert "TRAINING" in text and "PAUSED" in text and "UNRESPONSIVE" in text and "COMPLETED" in text
    assert "3/10" in text and "1m 05s" in text and "83.0%" in text


def test_runs_takes_the_logdir_from_the_environment(tmp_path, system_reading):
    write_run(tmp_path, "envrun", system_reading)
    rows = json.loads(invoke("runs", "--json", env={"TBHEALTH_LOGDIR": str(tmp_path)}).stdout)
    assert [r["run"] for r in rows] == ["envrun"]


def test_runs_on_an_empty_or_missing_folder(tmp_path):
    result = invoke("runs", str(tmp_path))
    assert result.exit_code == 0 and "No runs under" in result.stdout and "tbhealth train" in result.stdout
    assert json.loads(invoke("runs", str(tmp_path), "--json").stdout) == []
    result = invoke("runs", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no folder" in result.stderr and "TBHEALTH_LOGDIR" in result.stderr


def test_an_unreadable_status_is_listed_as_unknown(tmp_path, system_reading):
    write_run(tmp_path, "fine", system_reading)
    broken = RunDir(tmp_path / "broken")
    write_text_atomic(broken.status_path, "{not json")
    rows = json.loads(invoke("runs", str(tmp_path), "--json").stdout)
    assert {r["run"]: r["state"] for r in rows} == {"fine": "training", "broken": "unknown"}
    for row in rows:
        validate_run_summary(row)


# --------------------------------------------------------------------------- the trainer's writer


def test_the_heartbeat_writer_produces_a_valid_status(tmp_path, system_reading):
    """The lead's status builder and this schema must agree field for field."""
    from tbhealth.monitor.progress import Progress
    from tbhealth.run.status import build_status

    rd = RunDir(tmp_path / "hb")
    p = Progress(run="hb", total_epochs=4, state="training", epoch=2, epochs_done=1, batch=7, batches_per_epoch=20,
                 global_step=27, history=[{"train_loss": 1.2, "train_acc": 0.4, "val_loss": 1.3, "val_acc": 0.35,
                                           "lr": 0.1}], run_dir=str(rd.path), device="cpu", last_checkpoint="last.pt")
    rd.write_status(build_status(p, system=system_reading, alerts_active=0, health_score=100))
    validate_status(rd.read_status())
    data = json.loads(invoke("status", "hb", "--logdir", str(tmp_path), "--json").stdout)
    validate_status(data)
    assert data["metrics"]["val_loss"] == {"value": 1.3, "delta": None}


def test_a_real_training_through_monitor_reports_a_valid_status(tmp_path):
    """A tiny real training loop reporting to tbhealth.Monitor; the commands read what it wrote."""
    import torch

    import tbhealth

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x_all = torch.randn(40, 4)
    y_all = (x_all[:, 0] > 0).long()
    with tbhealth.Monitor(tmp_path, "tiny", total_epochs=2, model=model, optimizer=opt, verbose=False,
                          handle_signals=False, health=False, log_every=2) as mon:
        for _ in mon.epochs(batches_per_epoch=5):
            for i in range(5):
                x, y = x_all[i * 8:(i + 1) * 8], y_all[i * 8:(i + 1) * 8]
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out, y)
                loss.backward()
                opt.step()
                mon.step(loss, n=len(x), correct=(out.argmax(1) == y).sum())
                opt.zero_grad()
            with torch.no_grad():
                out = model(x_all)
                mon.end_epoch(val_loss=float(torch.nn.functional.cross_entropy(out, y_all)),
                              val_acc=float((out.argmax(1) == y_all).float().mean()), lr=0.1)

    data = validate_status(json.loads(invoke("status", "tiny", "--logdir", str(tmp_path), "--json").stdout))
    assert (data["state"], data["epoch"], data["batch"], data["global_step"]) == ("completed", 2, 5, 10)
    assert 0.0 <= data["metrics"]["val_acc"]["value"] <= 1.0 and data["metrics"]["val_loss"]["delta"] is not None
    rows = json.loads(invoke("runs", str(tmp_path), "--json").stdout)
    assert [(r["run"], r["state"], r["progress"]) for r in rows] == [("tiny", "completed", 1.0)]
    validate_run_summary(rows[0])
    assert "COMPLETED" in invoke("status", "tiny", "--logdir", str(tmp_path)).stdout


# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(
    ("name", "value", "delta", "expected"),
    [
        ("train_loss", 0.5, -0.1, "better"),
        ("val_loss", 0.5, 0.1, "worse"),
        ("val_loss", 0.5, 0.0001, "flat"),
        ("val_acc", 0.8, 0.02, "better"),
        ("train_acc", 0.8, -0.05, "worse"),
        ("val_acc", 0.8, 0.0005, "flat"),
        ("lr", 0.01, -0.005, "none"),
        ("val_loss", 0.5, None, "none"),
        ("train_loss", float("nan"), float("nan"), "none"),
    ],
)
def test_trend(name, value, delta, expected):
    assert render.trend(name, value, delta) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"epoch": 0, "total_epochs": 10, "batch": 0, "batches_per_epoch": 100}, 0.0),
        ({"epoch": 1, "total_epochs": 10, "batch": 50, "batches_per_epoch": 100}, 0.05),
        ({"epoch": 3, "total_epochs": 10, "batch": 40, "batches_per_epoch": None}, 0.2),
        ({"epoch": 10, "total_epochs": 10, "batch": 100, "batches_per_epoch": 100}, 1.0),
        ({"state": "completed"}, 1.0),
        ({"epoch": 2}, None),
    ],
)
def test_progress_fraction(status, expected):
    assert progress_fraction(status) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "—"), (0, "0s"), (59.6, "1m 00s"), (65, "1m 05s"), (3725, "1h 02m"), (2 * 86400 + 7200, "2d 2h")],
)
def test_format_duration(seconds, text):
    assert render.format_duration(seconds) == text


def test_badges_are_coloured_by_state():
    expected = {"training": "green", "paused": "yellow", "failed": "red", "unresponsive": "red",
                "completed": "bright_black", "stopped": "bright_black", "starting": "blue", "stopping": "blue"}
    for state, colour in expected.items():
        badge = render.format_badge(state)
        assert badge.plain == f" {state.upper()} " and str(badge.style).endswith(f"on {colour}")


def test_gpu_reading_is_valid_and_rendered_with_a_memory_bar(tmp_path, system_reading):
    gpu = {"name": "NVIDIA H100 80GB HBM3", "memory_used_bytes": 76 * 2**30, "memory_total_bytes": 80 * 2**30,
           "utilization_percent": 97.0, "torch_allocated_bytes": 70 * 2**30, "torch_reserved_bytes": 74 * 2**30}
    rd = write_run(tmp_path, "gpu", {**system_reading, "gpu": gpu})
    data = validate_status(json.loads(invoke("status", "gpu", "--logdir", str(tmp_path), "--json").stdout))
    assert data["system"]["gpu"] == gpu
    text = render_text(render.format_status(rd.read_status(), "gpu"), width=80)
    assert "GPU NVIDIA H100 80GB HBM3 · util 97%" in text
    assert "95% 76.0 GiB / 80.0 GiB" in text and "torch: 70.0 GiB allocated, 74.0 GiB reserved" in text
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"eta": 3.0}, "eta: Extra inputs are not permitted"),  # a misspelt field is caught
        ({"eta_s": -1.0}, "eta_s"),
        ({"state": "running"}, "state"),
        ({"health_score": 101}, "health_score"),
        ({"epoch": 2.0}, "epoch"),
        ({"interventions": {"pauses": 0, "stops": 0}}, "interventions.checkpoints"),
        ({"metrics": {"train_loss": None, "train_acc": None, "val_loss": None, "val_acc": None, "lr": None,
                      "grad_norm": {"value": 1.0}}}, "metrics.grad_norm"),
    ],
)
def test_schema_names_the_field_that_drifted(change, field, system_reading):
    doc = {**status_doc("r", system_reading), "updated_at": time.time(), **change}
    with pytest.raises(SchemaError, match=field.replace("[", r"\[")):
        validate_status(doc)

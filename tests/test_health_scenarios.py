"""The health engine on real trainings: each scenario trains a small real model for seconds and
checks that the right rule fired, on the right layer, as a user reads it back (the run's alerts
file, ``tbhealth alerts --json``, status, event files).

Divergence and pause/resume go through ``tbhealth train`` in a subprocess, like a user's run.
The other scenarios invoke the same ``tbhealth train`` command in this process (Typer's
CliRunner): the CLI's own code path, without paying for a fresh interpreter and torch import
each time. Every training runs on one thread: tiny models train fastest that way, and on a
2-core machine shared with other tests a second intra-op thread spins (25x slower, measured).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from tbhealth.run.rundir import RunDir
from tbhealth_cli.app import app
from tests.plugin_helpers import REPO, start_training, tbhealth_exe, train, wait_for_state

EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses
        yield
    torch.set_num_threads(threads)


def train_here(logdir: Path, name: str, config: Path, *overrides: str) -> RunDir:
    """``tbhealth train CONFIG --logdir LOGDIR --name NAME --set ...`` in this process."""
    args = ["train", str(config), "--logdir", str(logdir), "--name", name, "--quiet"]
    for o in overrides:
        args += ["--set", o]
    result = CliRunner().invoke(app, args)
    where = f"tbhealth {' '.join(args)} exited {result.exit_code}"
    assert result.exit_code == 0, f"{where}:\n{result.output}\n{result.exception!r}"
    return RunDir(logdir / name)


def write_config(path: Path, **sections) -> Path:
    """A complete config file (every key the scenario depends on is spelled out)."""
    cfg = {
        "seed": 0, "epochs": 1, "data": {"source": "digits", "batch_size": 64, "val_fraction": 0.2},
        "model": {"source": "mlp", "kwargs": {"hidden": [64, 64], "dropout": 0.0, "norm": "none"}},
        "loss": "CrossEntropyLoss", "optimizer": {"name": "Adam", "lr": 0.003}, "scheduler": {"name": None},
        "logging": {"every_steps": 5}, "health": {"every_steps": 10},
    }
    cfg.update(sections)
    path.write_text(yaml.safe_dump(cfg))
    return path


#: The built-in MLP whose second layer's bias is -10: its ReLU (act2) outputs 0 for every input.
DEAD = {"epochs": 2, "model": {"source": "tests.factories:mlp_with_dead_layer",
                               "kwargs": {"hidden": [64, 64], "dead": "fc2", "bias": -10.0}}}
#: A linear model (no hidden layer) on XOR-labelled points: no line separates the classes.
UNDERFIT = {"epochs": 12, "data": {"source": "tests.factories:xor_quadrants", "batch_size": 64},
            "model": {"source": "mlp", "kwargs": {"hidden": []}}, "optimizer": {"name": "Adam", "lr": 0.05}}


def by_rule(run: RunDir, rule: str) -> list[dict]:
    return [a for a in run.read_alerts() if a["rule"] == rule]


def scalar_at(run: RunDir, tag: str, step: int) -> float:
    acc = EventAccumulator(str(run.path), size_guidance={"scalars": 0})
    acc.Reload()
    [value] = [e.value for e in acc.Scalars(tag) if e.step == step]
    return value


def cli_json(*args: str):
    proc = subprocess.run([tbhealth_exe(), *args, "--json"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- scenarios


@pytest.mark.slow
def test_far_too_high_learning_rate_diverges_and_stops_with_a_checkpoint(tmp_path):
    train(tmp_path, "diverge", config=EXAMPLES / "diverge.yaml")  # exits 0: stopped as configured
    [alert] = [a for a in cli_json("alerts", "diverge", "--logdir", str(tmp_path)) if a["rule"] == "divergence"]
    assert alert["severity"] == "critical" and alert["layer"] is None and not alert["resolved"]
    # threshold = 10 x the FIRST step's loss, ~ln(10) = 2.3 for an untrained 10-class model; the
    # first logged loss (step 5) is already ~1e10 and 10x that would never fire.
    assert 20 < alert["threshold"] < 27, alert
    assert alert["value"] > alert["threshold"] and "Stopping training" in alert["message"]
    status = cli_json("status", "diverge", "--logdir", str(tmp_path))
    assert status["state"] == "stopped" and "divergence" in status["message"]
    assert status["global_step"] == alert["step"], "stopped at the step boundary where it fired"
    assert status["interventions"]["stops"] == 1
    [ckpt] = RunDir(tmp_path / "diverge").list_checkpoints()
    assert ckpt.name == "last.pt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == alert["step"]


def test_vanishing_gradients_name_the_first_layers_while_the_global_norm_looks_fine(tmp_path):
    run = train_here(tmp_path, "vanishing", EXAMPLES / "vanishing.yaml", "epochs=1")
    [alert] = by_rule(run, "vanishing_gradients")  # one root cause, one alert
    layers = [entry["layer"] for entry in alert["layers"]]
    assert layers[0] == alert["layer"] == "fc1" and set(layers) <= {f"fc{i}" for i in range(1, 6)}, layers
    assert "worst 'fc1'" in alert["message"] and alert["value"] < alert["threshold"] == 1e-7
    step = alert["step"]
    assert scalar_at(run, "health/grad_norm/fc1", step) < 1e-7
    assert scalar_at(run, "health/grad_norm/global", step) > 1e-3 > alert["threshold"], "the global norm hides it"


def test_dead_relu_layer_is_named(tmp_path):
    run = train_here(tmp_path, "dead", write_config(tmp_path / "dead.yaml", **DEAD))
    alerts = by_rule(run, "dead_neurons")
    assert [a["layer"] for a in alerts] == ["act2"], alerts
    assert "Layer 'act2' has dead units: 100% output 0" in alerts[0]["message"] and alerts[0]["value"] == 1.0
    assert scalar_at(run, "health/dead_units/act1", alerts[0]["step"]) < 0.5, "the layer before it is alive"


def test_large_model_on_a_tiny_training_set_overfits(tmp_path):
    run = train_here(tmp_path, "overfit", EXAMPLES / "overfit.yaml")
    metrics = run.read_status()["metrics"]
    assert metrics["train_acc"]["value"] - metrics["val_acc"]["value"] > 0.10
    open_alerts = [a for a in by_rule(run, "overfitting") if not a["resolved"]]
    assert len(open_alerts) == 1, run.read_alerts()
    assert open_alerts[0]["message"].startswith("Overfitting: ")
    assert not by_rule(run, "underfitting")


def test_linear_model_on_xor_underfits(tmp_path):
    run = train_here(tmp_path, "underfit", write_config(tmp_path / "underfit.yaml", **UNDERFIT))
    m = run.read_status()["metrics"]
    assert m["val_acc"]["value"] < 0.70 and m["train_loss"]["value"] > 0.5 and m["val_loss"]["value"] > 0.5
    [alert] = by_rule(run, "underfitting")
    assert alert["epoch"] >= 11, "needs 10 flat epochs after a first one"
    assert "> 0.5 with no improvement over 1% for 10 epochs while accuracy" in alert["message"]
    assert not by_rule(run, "dead_neurons") and not by_rule(run, "divergence")


def test_healthy_cnn_example_raises_no_alert(tmp_path):
    run = train_here(tmp_path, "cnn", EXAMPLES / "digits_cnn.yaml", "epochs=3")
    status = run.read_status()
    assert status["state"] == "completed" and status["metrics"]["val_acc"]["value"] > 0.8
    assert run.read_alerts() == []


@pytest.mark.slow
def test_pause_action_pauses_and_resume_does_not_repause_the_same_episode(tmp_path):
    config = write_config(tmp_path / "dead.yaml", **DEAD)
    logdir, out = tmp_path / "runs", tmp_path / "train.out"
    proc = start_training(logdir, "dead", "health.dead_neurons.action=pause", config=config, output=out)
    try:
        status = wait_for_state(logdir, "dead", ("paused", "completed", "stopped", "failed"), timeout=90)
        assert status["state"] == "paused", out.read_text()
        assert proc.poll() is None, "a paused run waits, it does not exit"
        run = RunDir(logdir / "dead")
        [alert] = by_rule(run, "dead_neurons")
        assert alert["layer"] == "act2" and alert["action"] == "pause"
        resume = subprocess.run([tbhealth_exe(), "resume", "dead", "--logdir", str(logdir)],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert resume.returncode == 0, resume.stdout + resume.stderr
        assert proc.wait(90) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    status = run.read_status()
    assert status["state"] == "completed", out.read_text()
    assert (status["interventions"]["pauses"], status["interventions"]["resumes"]) == (1, 1)
    [still] = by_rule(run, "dead_neurons")  # the condition persisted: one episode, still open, not re-acted on
    assert still["id"] == alert["id"] and not still["resolved"]

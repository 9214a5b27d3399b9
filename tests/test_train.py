"""``tbhealth train`` end to end: the default example, event files, resume, reproducibility."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbhealth.run.names import unique_run_dir

from tbhealth.run.rundir import RunDir
from tests.plugin_helpers import (
    DIGITS, REPO, free_port, start_tensorboard, stop_process, tbhealth_exe, train, wait_for, wait_for_listing,
)

EPOCH_TAGS = ("train/loss", "train/acc", "val/loss", "val/acc", "lr")


def scalars(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's example, exactly as shipped (``train`` fails it if it outlasts its timeout)."""
    logdir = tmp_path_factory.mktemp("default")
    proc = train(logdir, "digits")
    return logdir, logdir / "digits", proc


@pytest.mark.slow
def test_default_example_reaches_95_percent(default_run):
    logdir, run, proc = default_run
    cfg = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    s = RunDir(run).read_status()
    assert s["state"] == "completed"
    assert s["epoch"] == cfg["epochs"] and s["metrics"]["val_acc"]["value"] >= 0.95
    assert "Run completed" in proc.stdout and f"tbhealth board {logdir}" in proc.stdout
    assert (run / "config.yaml").is_file() and yaml.safe_load((run / "config.yaml").read_text())["epochs"] == cfg["epochs"]
    assert not RunDir(run).read_alerts(), "the default example raises no alert"


@pytest.mark.slow
def test_event_files_hold_one_point_per_epoch(default_run):
    logdir, run, _ = default_run
    epochs = RunDir(run).read_status()["total_epochs"]
    acc = scalars(run)
    tags = set(acc.Tags()["scalars"])
    assert set(EPOCH_TAGS) <= tags and {"step/loss", "step/grad_norm"} <= tags
    for tag in EPOCH_TAGS:
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, epochs + 1)), tag
    steps = [e.step for e in acc.Scalars("step/loss")]
    assert steps == sorted(set(steps))
    text_tags = acc.Tags()["tensors"]
    assert "logs" in text_tags


@pytest.mark.slow
def test_event_files_load_in_a_real_tensorboard(default_run):
    logdir, run, _ = default_run
    port = free_port()
    tb = start_tensorboard(logdir, port)
    try:
        wait_for_listing(port)

        def fetch(path):
            with urllib.request.urlopen(f"http://localhost:{port}{path}", timeout=5) as r:
                return json.loads(r.read())

        wait_for(lambda: "digits" in fetch("/data/runs"), 60, "run listed")
        q = urllib.parse.urlencode({"run": "digits", "tag": "val/acc"})
        points = wait_for(lambda: fetch(f"/data/plugin/scalars/scalars?{q}"), 60, "val/acc served")
        epochs = RunDir(run).read_status()["total_epochs"]
        assert [p[1] for p in points] == list(range(1, epochs + 1))
        assert points[-1][2] >= 0.95
        layout = fetch("/data/plugin/custom_scalars/layout")
        charts = [c for cat in layout["category"] for c in cat["chart"]]
        assert any(set(c["multiline"]["tag"]) >= {"^train/loss$", "^val/loss$"} for c in charts)
    finally:
        stop_process(tb)


@pytest.mark.slow
def test_resume_continues_without_duplicate_or_missing_steps(tmp_path):
    train(tmp_path, "r", "epochs=3")
    first = scalars(tmp_path / "r")
    last_step = first.Scalars("step/loss")[-1].step
    proc = subprocess.run(
        [tbhealth_exe(), "train", str(DIGITS), "--logdir", str(tmp_path), "--name", "r", "--resume", "--set", "epochs=5"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"], "resume reuses the run directory"
    acc = scalars(tmp_path / "r")
    for tag in EPOCH_TAGS:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5], tag
    steps = [e.step for e in acc.Scalars("step/loss")]
    assert steps == sorted(set(steps)), "no duplicated step"
    every = yaml.safe_load(DIGITS.read_text())["logging"]["every_steps"]
    assert all(b - a == every for a, b in zip(steps, steps[1:])), "no missing step"
    assert any(s > last_step for s in steps)
    s = RunDir(tmp_path / "r").read_status()
    assert s["state"] == "completed" and s["epoch"] == 5 and len(s["metrics"]) == 5


@pytest.mark.slow
def test_same_seed_same_curves(tmp_path):
    for name in ("a", "b"):
        train(tmp_path, name, "epochs=2", "seed=7")
    curves = [{t: [e.value for e in scalars(tmp_path / n).Scalars(t)] for t in (*EPOCH_TAGS, "step/loss")}
              for n in ("a", "b")]
    assert curves[0] == curves[1]
    train(tmp_path, "c", "epochs=2", "seed=8")
    other = [e.value for e in scalars(tmp_path / "c").Scalars("step/loss")]
    assert other != curves[0]["step/loss"]


def test_run_names_are_made_unique(tmp_path):
    a = unique_run_dir(tmp_path, "x")
    b = unique_run_dir(tmp_path, "x")
    assert (a.name, b.name) == ("x", "x-2")


def test_checkpoints_hold_everything_to_resume(tmp_path):
    train(tmp_path, "ck", "epochs=2", "checkpoint.keep_last=1", "checkpoint.every_epochs=1")
    ckdir = tmp_path / "ck" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["best.pt", "epoch-0002.pt", "last.pt"]
    state = torch.load(ckdir / "last.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "rng", "config"} <= set(state)
    assert state["epoch"] == 2


@pytest.mark.slow
def test_mid_epoch_stop_and_resume_matches_an_uninterrupted_run(tmp_path):
    """Stopped at step 30 (epoch 2 of 23-step epochs), resumed: same curves as never stopping.

    Exact because the batch order is a function of (seed, epoch), the RNG states and the epoch's
    partial sums travel in the checkpoint (dropout off: the DataLoader draws from the global RNG
    when it starts an epoch's iterator, which a resume does at a different point).
    """
    from tbhealth.training.config import load_config
    from tbhealth.training.trainer import Trainer

    cfg = load_config(DIGITS, ["epochs=3", "model.kwargs.dropout=0.0", "health.enabled=false"])
    whole = Trainer(cfg, unique_run_dir(tmp_path, "whole"), verbose=False)
    assert whole.fit() == "completed"

    parted = Trainer(cfg, unique_run_dir(tmp_path, "parted"), verbose=False)
    mon = parted.monitor
    parted.model.register_forward_hook(
        lambda *_: mon.request_stop("test") if mon.global_step == 30 and mon.model.training else None)
    assert parted.fit() == "stopped"
    assert mon.epochs_done == 1 and mon.global_step == 31  # stopped at the boundary after step 31
    resumed = Trainer(cfg, tmp_path / "parted", resume=True, verbose=False)
    assert resumed.fit() == "completed"

    a, b = whole.monitor.history, resumed.monitor.history
    assert [h["epoch"] for h in b] == [1, 2, 3]
    for ha, hb in zip(a, b):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-5), (ha["epoch"], key)


@pytest.mark.parametrize("saved, found", [({"format": 99}, "format 99"), ({"model": {}}, "no format version")])
def test_resume_refuses_a_checkpoint_of_another_format(tmp_path, saved, found):
    from typer.testing import CliRunner

    from tbhealth.training.checkpoint import FORMAT_VERSION
    from tbhealth_cli.app import app

    last = tmp_path / "old" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save(saved, last)
    result = CliRunner().invoke(app, ["train", str(DIGITS), "--logdir", str(tmp_path), "--name", "old", "--resume"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert str(last) in message and found in message and f"reads format {FORMAT_VERSION}" in message
    assert "Traceback" not in result.stderr

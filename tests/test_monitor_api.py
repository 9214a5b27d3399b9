"""The public surface: ``tbhealth``'s exports, and ``tbhealth.Monitor`` driven by plain loops
(the shipped examples/custom_loop.py as a user runs it, and small loops in this process)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

import tbhealth
from tbhealth.run.rundir import RunDir
from tbhealth.training.data import digits
from tests.plugin_helpers import REPO, control_and_wait, tbhealth_exe, wait_for_state

CUSTOM_LOOP = REPO / "examples" / "custom_loop.py"
EPOCH_TAGS = ("train/loss", "train/acc", "val/loss", "val/acc", "lr")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models; a shared 2-core machine


def scalar_tags(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


# --------------------------------------------------------------------------- the package


def test_public_surface_is_what_was_meant():
    assert sorted(tbhealth.__all__) == sorted(
        ["__version__", "Monitor", "Config", "load_config", "ConfigError", "Trainer", "RunDir"])
    assert dir(tbhealth) == sorted(tbhealth.__all__)
    for name in tbhealth.__all__:
        assert getattr(tbhealth, name) is not None, name
    from tbhealth.monitor import Monitor

    assert tbhealth.Monitor is Monitor
    with pytest.raises(AttributeError, match="no attribute 'Monitr'"):
        tbhealth.Monitr


def test_importing_tbhealth_does_not_import_torch():
    """The TensorBoard plugin and the CLI's inspection commands rely on this to stay light."""
    code = ("import sys, tbhealth; tbhealth.RunDir; tbhealth.__version__; dir(tbhealth); "
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- examples/custom_loop.py


@pytest.mark.slow
def test_custom_loop_example_writes_a_complete_run(tmp_path):
    proc = subprocess.run([sys.executable, str(CUSTOM_LOOP), "--logdir", str(tmp_path), "--epochs", "3"],
                          capture_output=True, text=True, timeout=180, cwd=REPO, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = RunDir(tmp_path / "custom-loop")
    s = run.read_status()
    assert (s["state"], s["epoch"], s["total_epochs"]) == ("completed", 3, 3)
    assert s["metrics"]["val_acc"]["value"] > 0.85 and s["batches_per_epoch"] == 23
    acc = scalar_tags(run.path)
    tags = set(acc.Tags()["scalars"])
    for tag in EPOCH_TAGS:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3], tag
    logged = [e.step for e in acc.Scalars("step/loss")]
    assert logged and all(s % 50 == 0 for s in logged) and logged[0] == 50  # log_every default 50
    assert {"step/grad_norm", "health/grad_norm/global", "health/dead_units/1"} <= tags  # step 50 sampled
    assert run.read_alerts() == []
    alerts = subprocess.run([tbhealth_exe(), "alerts", "custom-loop", "--logdir", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert alerts.returncode == 0 and alerts.stdout.strip() == "[]", alerts.stdout + alerts.stderr


@pytest.mark.slow
def test_custom_loop_example_obeys_checkpoint_and_stop(tmp_path):
    out = tmp_path / "loop.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, str(CUSTOM_LOOP), "--logdir", str(tmp_path), "--epochs", "100000"],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=ONE_THREAD)
    try:
        wait_for_state(tmp_path, "custom-loop", ("training",), timeout=90)
        ack = control_and_wait(tmp_path, "custom-loop", "checkpoint")
        assert ack["status"] == "done", ack
        saved = torch.load(ack["path"], weights_only=False)
        assert saved["step"] == ack["step"] and "0.weight" in saved["model"]
        ack = control_and_wait(tmp_path, "custom-loop", "stop")
        assert ack["status"] == "done" and ack["checkpoint"].startswith("stop-step-"), ack
        assert proc.wait(60) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    s = RunDir(tmp_path / "custom-loop").read_status()
    assert s["state"] == "stopped" and s["interventions"]["checkpoints"] == 1, s


# --------------------------------------------------------------------------- Monitor in this process


@pytest.fixture(scope="module")
def data():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val = digits(val_fraction=0.2, seed=0)
    yield DataLoader(train, batch_size=128, shuffle=True), val.tensors
    torch.set_num_threads(threads)


def has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks for m in model.modules())


def run_loop(mon: tbhealth.Monitor, model: nn.Module, data, *, stop_at: int | None = None,
             raise_at: int | None = None) -> list[bool]:
    """A plain loop reporting to ``mon``; returns, after each step, whether hooks were registered."""
    loader, (x_val, y_val) = data
    opt, loss_fn, armed = mon.optimizer, nn.CrossEntropyLoss(), []
    for _ in mon.epochs(batches_per_epoch=len(loader)):
        for x, y in loader:
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            mon.step(loss, n=len(x), correct=(out.argmax(1) == y).sum())
            opt.zero_grad()
            armed.append(has_hooks(model))
            if mon.global_step == raise_at:
                raise RuntimeError("deliberate failure in the loop")
            if mon.global_step == stop_at:
                mon.request_stop("test asked to stop")
            if mon.should_stop:
                break
        if mon.should_stop:
            break
        with torch.no_grad():
            out = model(x_val)
        mon.end_epoch(val_loss=loss_fn(out, y_val).item(), val_acc=(out.argmax(1) == y_val).float().mean().item())
    return armed


def make_monitor(tmp_path: Path, name: str, model: nn.Module, **kwargs) -> tbhealth.Monitor:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return tbhealth.Monitor(tmp_path, name, total_epochs=2, model=model, optimizer=opt, verbose=False,
                            system_metrics=False, **kwargs)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_hooks_exist_only_around_sampled_steps(tmp_path, data):
    model = mlp()
    with make_monitor(tmp_path, "sampled", model, health={"every_steps": 3}) as mon:
        armed = run_loop(mon, model, data)
    assert armed[:6] == [False, True, False, False, True, False]  # armed before steps 3, 6, ...
    assert not has_hooks(model)
    assert RunDir(mon.run_dir).read_status()["state"] == "completed"


@pytest.mark.parametrize("ending, kwargs",
                         [("completed", {}), ("stopped", {"stop_at": 5}), ("failed", {"raise_at": 5})])
def test_no_hook_is_left_on_the_model_however_the_run_ends(tmp_path, data, ending, kwargs):
    model = mlp()
    mon = make_monitor(tmp_path, ending, model, health={"every_steps": 1})  # armed after every step
    with pytest.raises(RuntimeError) if ending == "failed" else contextlib.nullcontext():
        with mon:
            armed = run_loop(mon, model, data, **kwargs)
            assert all(armed)
    assert not has_hooks(model)
    assert RunDir(mon.run_dir).read_status()["state"] == ending


def test_monitor_without_health_checks(tmp_path, data):
    model = mlp()
    with make_monitor(tmp_path, "nohealth", model, health=False, log_every=5) as mon:
        armed = run_loop(mon, model, data)
    assert mon.health is None and not any(armed)
    rd = RunDir(mon.run_dir)
    s = rd.read_status()
    assert s["state"] == "completed" and s["alerts_active"] == 0 and s["health_score"] == 100
    tags = set(scalar_tags(rd.path).Tags()["scalars"])
    assert set(EPOCH_TAGS) | {"step/loss", "step/grad_norm"} <= tags
    assert not [t for t in tags if t.startswith("health/")]
    assert rd.read_alerts() == []

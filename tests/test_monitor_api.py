"""The public surface: ``tbhealth``'s exports, and ``tbhealth.Monitor`` driven by plain loops
(the shipped examples/custom_loop.py as a user runs it, and small loops in this process)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

import tbhealth
from tbhealth.run.rundir import RunDir
from tbhealth.training.data import digits
from tests.plugin_helpers import REPO, control_and_wait, tbhealth_exe, wait_for, wait_for_state

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
    # each of the first health.dense_steps (10) steps, then every log_every (default 50)
    assert logged[:10] == list(range(1, 11)) and logged[10:] and all(s % 50 == 0 for s in logged[10:])
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
    # --resume: Monitor(resume_state=...) continues the same run folder, to the end
    resumed = subprocess.run([sys.executable, str(CUSTOM_LOOP), "--logdir", str(tmp_path), "--epochs",
                              str(s["epochs_done"] + 1), "--resume", ack["path"]], capture_output=True, text=True,
                             timeout=180, cwd=REPO, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["custom-loop"]
    s = RunDir(tmp_path / "custom-loop").read_status()
    assert (s["state"], s["epochs_done"], s["interventions"]["stops"]) == ("completed", s["total_epochs"], 1)


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
    with make_monitor(tmp_path, "sampled", model, health={"every_steps": 3, "dense_steps": 2}) as mon:
        armed = run_loop(mon, model, data)
    # after each step: armed for the next one, step 2 (the first two are observed densely), 3, 6, ...
    assert armed[:7] == [True, True, False, False, True, False, False]
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


# --------------------------------------------------------------------------- the public API a framework uses


def test_checkpoint_hook_gets_the_monitor_state_and_a_resume_continues_from_it(tmp_path, data):
    """``checkpoint_fn(kind, state)`` receives ``state_dict()``; ``load_state_dict(state, batch=)``
    before ``start()`` continues the run there (what a Lightning or HF callback relies on)."""
    model, saved = mlp(), {}

    def save(kind, state):
        saved[kind] = state
        path = tmp_path / f"{kind}.pt"
        torch.save({"monitor": state}, path)
        return path

    with make_monitor(tmp_path, "hook", model, health=False, checkpoint_fn=save) as mon:
        run_loop(mon, model, data, stop_at=7)
        assert mon.save_checkpoint("extra") == tmp_path / "extra.pt"
    stop = saved["stop"]
    # asked after step 7, applied at the next step boundary
    assert (stop["global_step"], stop["epoch"], stop["epochs_done"], stop["batch"]) == (8, 1, 0, 8)
    assert stop["epoch_sums"][2] == 8 * 128  # a mid-epoch state keeps the epoch's sums (count: samples)
    status = RunDir(mon.run_dir).read_status()
    assert status["last_checkpoint"] == "extra.pt" and status["state"] == "stopped"

    resumed = make_monitor(tmp_path, "hook-resumed", model, health=False)
    resumed.load_state_dict(stop, batch=3)  # e.g. twice the batch size now: 3 of its batches done
    assert (resumed.global_step, resumed.epochs_done) == (8, 0)
    with resumed:
        with pytest.raises(RuntimeError, match="before start"):
            resumed.load_state_dict(stop)
        resumed.start_epoch(1, 10)
        assert resumed.progress.batch == 3  # the position load_state_dict restored
        resumed.end_epoch(val_loss=1.0)
    assert resumed.history[0]["train_loss"] == pytest.approx(stop["epoch_sums"][0] / stop["epoch_sums"][2])


def test_start_writes_the_runs_own_health_settings(tmp_path):
    with tbhealth.Monitor(tmp_path, "settings", total_epochs=1, verbose=False, system_metrics=False,
                          handle_signals=False, health={"divergence": {"factor": 20.0, "action": "stop"}}) as mon:
        settings = mon.run.read_health_settings()
    assert settings["divergence"] == {"enabled": True, "action": "stop", "factor": 20.0, "resolve_factor": 10.0,
                                      "nonfinite_gradients": True}  # a null resolve_factor follows factor
    assert settings["memory"]["max_fraction"] == 0.95 and settings["enabled"] is True
    with tbhealth.Monitor(tmp_path, "off", total_epochs=1, verbose=False, system_metrics=False,
                          handle_signals=False, health=False) as mon:
        assert mon.run.read_health_settings()["enabled"] is False


def test_start_writes_the_measured_layers_in_model_order(tmp_path):
    """The per-layer view's rows: every measured layer (parameters or activations) in the model's
    own order, whatever order TensorBoard lists their series in; none without health checks."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Dropout(),
                          nn.Linear(8, 2))
    model[0].requires_grad_(False)  # frozen, and no activation: nothing measured
    with make_monitor(tmp_path, "layers", model, handle_signals=False) as mon:
        layers = mon.run.read_layers()
    assert layers == ["1", "2.0", "2.1", "4"]
    with make_monitor(tmp_path, "nolayers", mlp(), handle_signals=False, health=False) as mon:
        assert mon.run.read_layers() is None


def test_status_names_the_process_and_the_device(tmp_path, data):
    model = mlp()
    with make_monitor(tmp_path, "who", model, health=False) as mon:
        run_loop(mon, model, data)
    s = RunDir(mon.run_dir).read_status()
    assert (s["pid"], s["host"], s["device"]) == (os.getpid(), socket.gethostname(), "cpu")
    assert s["run_dir"] == str(mon.run_dir.absolute()) and s["last_checkpoint"] is None


def test_log_counts_are_exact_when_threads_log_at_once(tmp_path):
    """The training thread and the monitor's own threads all log; no count may be lost."""
    with tbhealth.Monitor(tmp_path, "counts", total_epochs=1, verbose=False, system_metrics=False,
                          handle_signals=False, health=False) as mon:
        def burst(_):
            for _ in range(300):
                mon.log("WARNING", "w", echo=False)
                mon.log("ERROR", "e", echo=False)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(burst, range(4)))
    counts = RunDir(mon.run_dir).read_status()["log_counts"]
    assert counts == {"warnings": 1200, "errors": 1200}


def test_a_failing_status_write_is_logged_and_its_recovery_too(tmp_path):
    """The heartbeat never dies silently: a status it cannot write is an ERROR in the run's log."""
    mon = tbhealth.Monitor(tmp_path, "disk", total_epochs=1, verbose=False, system_metrics=False,
                           handle_signals=False, health=False, heartbeat_s=0.05)
    rd = mon.run
    with mon:
        rd.status_path.unlink()
        rd.status_path.mkdir()  # os.replace onto a directory fails, as a vanished mount would

        def logged(fragment):
            return lambda: any(fragment in r["message"] for r in rd.read_log()[0])

        wait_for(logged("status writer failed: IsADirectoryError"), 30, "the failure in the run's log")
        rd.status_path.rmdir()
        wait_for(logged("status writer works again"), 30, "the recovery in the run's log")
    records, _ = rd.read_log()
    assert sum("status writer failed" in r["message"] for r in records) == 1, "reported once per streak"
    assert rd.read_status()["state"] == "completed" and rd.read_status()["log_counts"]["errors"] == 1


def test_a_checkpoint_written_in_the_background_is_acknowledged_once_on_disk(tmp_path, data):
    """``checkpoint_fn`` may return a Future (an asynchronous writer, a framework that saves later):
    the request's acknowledgement waits for it, the run keeps training meanwhile, and a stop waits
    for its own checkpoint before the loop is told to leave."""
    model, writes, release = mlp(), [], threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)

    def save(kind, state):
        path = tmp_path / f"{kind}-{state['global_step']}.pt"

        def write():
            if kind == "manual":
                assert release.wait(60)
            torch.save({"monitor": state}, path)
            writes.append(path.name)
            return path

        return pool.submit(write)

    with make_monitor(tmp_path, "async", model, health=False, checkpoint_fn=save) as mon:
        rid = mon.run.request_control("checkpoint", source="test")
        loader, _ = data
        steps, deadline = 0, time.monotonic() + 60
        while rid not in mon.run.read_acks() and time.monotonic() < deadline:
            for x, y in loader:  # training goes on while the write waits
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.optimizer.step()
                mon.step(loss, n=len(x))
                mon.optimizer.zero_grad()
                steps += 1
                if steps == 50:  # polled by now (every 0.1 s) and still held back: no answer yet
                    assert rid not in mon.run.read_acks() and writes == []
                    release.set()
        ack = mon.run.read_acks()[rid]
        assert ack["status"] == "done" and ack["checkpoint"] in writes, ack
        mon.request_stop("test asked to stop")
        mon.step(loss.detach(), n=1)
        assert mon.should_stop and any(w.startswith("stop-") for w in writes)
    status = RunDir(mon.run_dir).read_status()
    assert status["interventions"]["checkpoints"] == 1 and status["interventions"]["stops"] == 1
    assert status["last_checkpoint"].startswith("stop-")
    pool.shutdown()


def test_the_stop_checkpoint_stores_the_stop_it_belongs_to(tmp_path, data):
    """A resumed run keeps counting the stop that ended its previous session."""
    model, saved = mlp(), {}

    def save(kind, state):
        saved[kind] = state
        return tmp_path / f"{kind}.pt"

    with make_monitor(tmp_path, "stops", model, health=False, checkpoint_fn=save) as mon:
        run_loop(mon, model, data, stop_at=2)
    assert saved["stop"]["interventions"]["stops"] == 1

"""The Monitor calls a framework callback or a custom loop builds on (issue 12, point 3): resume
into the same run, runs planned in steps, the lifecycle by hand, the checkpoint folder and atomic
saves, signals (SIGHUP, chaining), ``step/lr``, a JSON-safe state, pre-clip per-layer norms, and
the resume hint that stop messages and the CLI give. Real tiny trainings in this process."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from typer.testing import CliRunner

import tbhealth
from tbhealth.run.rundir import RunDir
from tbhealth.run.schema import validate_status
from tbhealth.run.status import estimate_steps_eta, progress_fraction
from tbhealth_cli.app import app
from tests.plugin_helpers import wait_for

PER_EPOCH = 4  # batches per epoch of train()


def monitor(tmp_path: Path, name: str, *, lr: float = 0.05, **kwargs) -> tbhealth.Monitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kwargs = {"verbose": False, "system_metrics": False, "health": False, "handle_signals": False, **kwargs}
    return tbhealth.Monitor(tmp_path, name, model=model, optimizer=opt, **kwargs)


def one_step(mon: tbhealth.Monitor, g: torch.Generator | None = None, **step) -> torch.Tensor:
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    loss = nn.functional.cross_entropy(mon.model(x), y)
    loss.backward()
    mon.optimizer.step()
    mon.step(loss, n=len(x), **step)
    mon.optimizer.zero_grad()
    return loss


def train(mon: tbhealth.Monitor, *, stop_at: int | None = None, each_step=None, **step) -> None:
    """The README's loop: ``epochs()``, a step per batch, the outer break on a stop, and the
    run's own end (``total_steps``) checked after each step."""
    g = torch.Generator().manual_seed(0)
    planned = mon.progress.total_steps
    for _ in mon.epochs(batches_per_epoch=PER_EPOCH):
        for _ in range(PER_EPOCH):
            loss = one_step(mon, g, **{k: v(mon.global_step + 1) for k, v in step.items()})
            if each_step is not None:
                each_step(mon)
            if mon.global_step == stop_at:
                mon.request_stop("test asked to stop")
            if mon.should_stop or (planned and mon.global_step >= planned):
                break
        if mon.should_stop:
            break
        mon.end_epoch(val_loss=loss.item())


def scalars(run: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


# --------------------------------------------------------------------------- resume


def test_resume_state_continues_the_same_run_folder_and_its_stop_count(tmp_path):
    saved = {}

    def save(kind, state):
        saved[kind] = json.loads(json.dumps(state))  # kept as JSON, as a framework may keep it
        return tmp_path / f"{kind}.pt"

    first = monitor(tmp_path, "exp", total_epochs=3, checkpoint_fn=save)
    with first:
        train(first, stop_at=5)  # applied at the next boundary: step 6, in epoch 2
    state = saved["stop"]
    assert state["run_dir"] == str(first.run_dir.absolute()) and state["interventions"]["stops"] == 1

    resumed = monitor(tmp_path, "exp", total_epochs=3, resume_state=state)  # one call: no run_dir, no batch
    assert resumed.run_dir == first.run_dir and (resumed.global_step, resumed.epochs_done) == (6, 1)
    with resumed:
        train(resumed)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["exp"]  # not exp-2
    status = RunDir(first.run_dir).read_status()
    assert status["state"] == "completed" and status["epochs_done"] == 3
    assert status["interventions"]["stops"] == 1  # counted in the stop checkpoint, not lost
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]

    gone = {**state, "run_dir": str(tmp_path / "moved-away")}  # a folder that no longer exists
    assert monitor(tmp_path, "exp", total_epochs=3, resume_state=gone).run_dir == tmp_path / "exp-2"


def test_the_state_is_plain_json(tmp_path):
    """Hugging Face keeps callback state in trainer_state.json: a JSON round trip changes nothing."""
    mon = monitor(tmp_path, "json", total_epochs=1, health={"every_steps": 2}, log_every=2)
    with mon:
        mon.start_epoch(1, PER_EPOCH)
        for _ in range(3):
            one_step(mon)
        state = mon.state_dict()  # mid-epoch: progress, the epoch's sums, the health histories
    assert state["epoch_sums"] and state["health"]["step_losses"]
    assert json.loads(json.dumps(state)) == state


# --------------------------------------------------------------------------- steps, lifecycle


def test_a_run_planned_in_steps_has_progress_an_eta_and_ends_there(tmp_path):
    seen = []

    def status_now(mon):
        if mon.global_step in (3, 6):  # the heartbeat's view of this very step
            status = wait_for(lambda: (s := mon.run.read_status()) and s["global_step"] == mon.global_step and s,
                              30, f"the status of step {mon.global_step}")
            seen.append(validate_status(status))

    mon = monitor(tmp_path, "steps", total_steps=10, heartbeat_s=0.05)  # no total_epochs
    with mon:
        train(mon, each_step=status_now)
    for status, step in zip(seen, (3, 6)):
        assert (status["total_epochs"], status["total_steps"]) == (None, 10)
        assert status["eta_s"] is not None and status["eta_s"] >= 0
        assert progress_fraction(status) == pytest.approx(step / 10)
    final = validate_status(mon.run.read_status())
    assert final["state"] == "completed" and final["global_step"] == 10
    assert final["epochs_done"] == 3  # 4 + 4 + 2 steps: epochs() stopped at total_steps
    shown = CliRunner().invoke(app, ["status", str(mon.run_dir)])
    assert shown.exit_code == 0 and "Step 10/10" in shown.stdout, shown.stdout


def test_step_eta_and_progress_are_pure_functions_of_the_status():
    assert estimate_steps_eta(10.0, 5, 20) == pytest.approx(30.0)
    assert estimate_steps_eta(10.0, 0, 20) is None and estimate_steps_eta(10.0, 20, 20) == 0.0
    steps = {"global_step": 5, "total_steps": 20, "epoch": 1, "total_epochs": None}
    assert progress_fraction(steps) == pytest.approx(0.25)
    both = {**steps, "total_epochs": 2, "epoch": 2, "batch": 0, "batches_per_epoch": 10}
    assert progress_fraction(both) == pytest.approx(0.5)  # the nearer end: 1 of 2 epochs done


@pytest.mark.parametrize("kwargs, message", [
    ({"total_steps": 0}, "total_steps must be a whole number >= 1"),
    ({"total_epochs": 2.5}, "total_epochs must be a whole number >= 1"),
    ({"total_epochs": 1, "handle_signals": "yes"}, "handle_signals must be True, 'chain' or False"),
])
def test_bad_plans_fail_before_any_folder_exists(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        monitor(tmp_path, "bad", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_the_lifecycle_by_hand_as_a_framework_callback_drives_it(tmp_path):
    """``start``, ``start_epoch``, ``step``, ``close(state, message)``: a framework that ended the
    run its own way (Lightning's SIGTERM exit) says how; a crash goes through ``fail``."""
    mon = monitor(tmp_path, "by-hand", total_epochs=2).start()
    mon.start_epoch(1, PER_EPOCH)
    for _ in range(2):
        one_step(mon)
    assert mon.state == "training" and mon.progress.batch == 2
    mon.close("stopped", message="the framework ended on SIGTERM")
    status = mon.run.read_status()
    assert (status["state"], status["message"], status["interventions"]["stops"]) == (
        "stopped", "the framework ended on SIGTERM", 1)

    crashed = monitor(tmp_path, "crash", total_epochs=1).start()
    crashed.fail(RuntimeError("CUDA error: out of memory"))
    assert crashed.run.read_status()["state"] == "failed"
    assert any("CUDA error" in r["message"] for r in crashed.run.read_log()[0])


def test_checkpoint_folder_and_atomic_saves(tmp_path):
    mon = monitor(tmp_path, "files", total_epochs=1)
    assert mon.checkpoint_dir == mon.run_dir / "checkpoints"
    path = mon.save_atomic({"w": torch.ones(2)}, "a.pt")
    assert path == mon.checkpoint_dir / "a.pt" and torch.equal(torch.load(path)["w"], torch.ones(2))
    with pytest.raises(RuntimeError, match="killed"):
        with mon.atomic_path("a.pt") as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise RuntimeError("killed mid-write")
    assert torch.equal(torch.load(path)["w"], torch.ones(2))  # the old file, whole
    with mon.atomic_path("b.ckpt"):
        pass  # a writer that wrote nothing (another DDP rank): nothing appears
    with mon.atomic_path("c.ckpt") as tmp:
        tmp.write_bytes(b"complete")
    assert (mon.checkpoint_dir / "c.ckpt").read_bytes() == b"complete"
    assert sorted(os.listdir(mon.checkpoint_dir)) == ["a.pt", "c.ckpt"]  # no temp file left


def test_atomic_saves_never_follow_a_symlinked_checkpoint_folder(tmp_path):
    """Whoever can write the logdir may swap ``checkpoints/`` for a symlink to somewhere else:
    a save replaces the link with a real folder (the link's target is never touched), as every
    state-file writer does, and so do links of one state and writers that take a file name."""
    from tbhealth.run.files import link_atomic

    mon = monitor(tmp_path, "swapped", total_epochs=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for save in ("save_atomic", "atomic_path"):
        mon.checkpoint_dir.symlink_to(elsewhere, target_is_directory=True)
        if save == "save_atomic":
            mon.save_atomic({"w": torch.ones(1)}, "a.pt")
        else:
            with mon.atomic_path("b.ckpt") as tmp:
                tmp.write_bytes(b"x")
        assert not mon.checkpoint_dir.is_symlink(), save
        shutil.rmtree(mon.checkpoint_dir)
    mon.save_atomic({"w": torch.ones(1)}, "a.pt")
    link_atomic(mon.checkpoint_dir / "a.pt", mon.checkpoint_dir / "best.pt", root=mon.run_dir)
    assert os.path.samefile(mon.checkpoint_dir / "a.pt", mon.checkpoint_dir / "best.pt")
    assert os.listdir(elsewhere) == []


def test_atomic_path_hands_out_a_name_in_the_folder_it_checked(tmp_path):
    """The writer gets a name through the opened folder (Linux: /proc/self/fd), so renaming the
    folder and putting a symlink in its place meanwhile cannot redirect the write."""
    mon = monitor(tmp_path, "pinned", total_epochs=1)
    mon.checkpoint_dir.mkdir()
    moved, elsewhere = mon.run_dir / "moved", tmp_path / "elsewhere"
    elsewhere.mkdir()
    with mon.atomic_path("c.ckpt") as tmp:
        mon.checkpoint_dir.rename(moved)
        mon.checkpoint_dir.symlink_to(elsewhere, target_is_directory=True)
        tmp.write_bytes(b"complete")
    assert os.listdir(elsewhere) == [] and (moved / "c.ckpt").read_bytes() == b"complete"


# --------------------------------------------------------------------------- signals


def signalled(mon: tbhealth.Monitor, signum: int) -> None:
    """A signal arrives during an epoch's first step; the step boundary applies it."""
    if not mon.progress.epoch:
        mon.start_epoch(1, PER_EPOCH)
    os.kill(os.getpid(), signum)
    one_step(mon)


def test_chained_sigterm_stops_and_calls_the_handler_found_before(tmp_path):
    calls = []
    theirs = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # e.g. Lightning's
    try:
        mine = signal.getsignal(signal.SIGTERM)
        mon = monitor(tmp_path, "chain", total_epochs=1, handle_signals="chain")
        with mon:
            signalled(mon, signal.SIGTERM)
            assert mon.should_stop and calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is mine  # restored at close
        assert mon.run.read_status()["message"] == "received SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, theirs)


def test_chaining_keeps_first_ctrl_c_a_stop_and_the_second_an_abort(tmp_path):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's: never chained
    mon = monitor(tmp_path, "ctrl-c", total_epochs=1, handle_signals="chain")
    with pytest.raises(KeyboardInterrupt):
        with mon:
            signalled(mon, signal.SIGINT)
            assert mon.should_stop  # the first: a stop, not an interrupt
            signalled(mon, signal.SIGINT)
    assert mon.run.read_status()["state"] == "stopped"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_closed_terminal_stops_the_run_unless_hangups_are_ignored(tmp_path):
    mon = monitor(tmp_path, "hup", total_epochs=1, handle_signals=True)
    with mon:
        signalled(mon, signal.SIGHUP)
        assert mon.should_stop
    assert mon.run.read_status()["message"] == "received SIGHUP (the terminal was closed)"

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # started under nohup
    try:
        with monitor(tmp_path, "nohup", total_epochs=1, handle_signals=True):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


# --------------------------------------------------------------------------- values


def test_step_lr_shows_a_warm_up_that_the_epoch_value_cannot(tmp_path):
    mon = monitor(tmp_path, "lr", total_epochs=2, lr=0.1, log_every=2)
    warm_up = torch.optim.lr_scheduler.LambdaLR(mon.optimizer, lambda i: min(1.0, (i + 1) / 4))

    with mon:
        train(mon, each_step=lambda m: warm_up.step())  # the scheduler steps after mon.step()
    used = {s: 0.1 * min(1.0, s / 4) for s in range(1, 9)}  # the rate step s trained with
    logged = scalars(mon.run_dir, "step/lr")
    assert sorted(logged) == [2, 4, 6, 8]  # on logging steps, from the optimizer
    assert all(math.isclose(v, used[s], rel_tol=1e-6) for s, v in logged.items()), logged
    # the epoch's lr is the optimizer's at end_epoch: after the epoch's last scheduler step
    assert mon.history[0]["lr"] == pytest.approx(used[5])

    given = monitor(tmp_path, "lr-given", total_epochs=1, log_every=2)
    with given:
        train(given, lr=lambda step: 1e-3 * step)  # step(lr=): the loop says which rate it used
    assert scalars(given.run_dir, "step/lr") == pytest.approx({2: 2e-3, 4: 4e-3})


@pytest.mark.parametrize("ready", [True, False])
def test_gradients_ready_samples_per_layer_norms_before_clipping(tmp_path, ready):
    mon = monitor(tmp_path, f"clip-{ready}", total_epochs=1, health={"every_steps": 1}, log_every=100)
    totals = {}
    with mon:
        mon.start_epoch(1, 3)
        for step in (1, 2, 3):
            x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
            loss = nn.functional.cross_entropy(mon.model(x), y)
            loss.backward()
            if ready:
                mon.gradients_ready()
            totals[step] = float(nn.utils.clip_grad_norm_(mon.model.parameters(), 1e-3))
            mon.optimizer.step()
            mon.step(loss, n=len(x))
            mon.optimizer.zero_grad()
    layers = [scalars(mon.run_dir, f"health/grad_norm/{name}") for name in ("0", "2")]
    sampled = sorted(set(layers[0]) & set(layers[1]))
    assert sampled and set(sampled) <= set(totals)
    for step in sampled:
        norm = math.hypot(layers[0][step], layers[1][step])  # the layers' norms make up the total
        expected = totals[step] if ready else 1e-3  # before clipping, or after it
        assert norm == pytest.approx(expected, rel=1e-3), (step, norm, expected)


# --------------------------------------------------------------------------- messages


def test_stop_messages_and_the_cli_name_how_this_loop_continues(tmp_path):
    hint = "continue it with `python train.py --resume`"
    mine = monitor(tmp_path, "own", total_epochs=3, resume_hint=hint)
    with mine:
        train(mine, stop_at=2)
    assert any(r["message"].endswith(f"; {hint}") for r in mine.run.read_log()[0] if "stopping:" in r["message"])
    answer = CliRunner().invoke(app, ["stop", str(mine.run_dir)])
    said = " ".join(answer.stderr.split())
    assert answer.exit_code == 3 and hint in said and "tbhealth train" not in said, said

    plain = monitor(tmp_path, "plain", total_epochs=1)  # the default: a custom loop's resume
    with plain:
        train(plain)
    answer = CliRunner().invoke(app, ["pause", str(plain.run_dir)])
    said = " ".join(answer.stderr.split())
    assert "start a new run, or continue it by running your loop again with `Monitor(..., resume_state=state)`" in said
    assert plain.run.read_status()["resume_hint"].startswith("continue it by running your loop again")

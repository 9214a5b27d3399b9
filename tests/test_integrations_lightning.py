"""``tbhealth.integrations.lightning.TBHealthCallback`` in real Lightning trainings (CPU, offline):
the digits module of examples/lightning_digits.py in 1 and 2 Gloo processes, steered from the
real ``tbhealth`` CLI and by SIGTERM, its step values against what the module itself saw, a planted
NaN, and a Lightning resume into the same tbhealth run."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest

from tbhealth.health.settings import HealthConfig
from tbhealth.run.rundir import RunDir
from tests.integration_helpers import (REPO, acks, import_error_without, kill_if_alive, only_run, run_app, scalars,
                                       start_app, steer, stopped_by_divergence, wait_run)


def lightning_run(logdir: Path, version: int = 0) -> Path:
    """Where the callback puts the run: next to the TensorBoardLogger's own events."""
    return logdir / "lightning_logs" / f"version_{version}" / "tbhealth"


def live_run(tmp_path: Path, *args: str) -> tuple[Path, subprocess.Popen, Path]:
    """A long training, in the background, once its run reads ``training``."""
    logdir, out = tmp_path / "pl", tmp_path / "pl.out"
    proc = start_app("lightning", out, "--logdir", str(logdir), "--epochs", "1000", "--log-every", "4",
                     "--step-sleep", "0.01", *args)
    run = lightning_run(logdir)
    wait_run(run, ("training",), proc, out, timeout=240)
    return run, proc, out


def pause_resume_checkpoint(run: Path) -> Path:
    """Steer a live run from the CLI; returns the checkpoint file it answered with."""
    assert "paused at epoch" in steer(run, "pause")
    assert RunDir(run).read_status()["state"] == "paused"
    assert "resumed at epoch" in steer(run, "resume")
    manual = Path(steer(run, "checkpoint").split()[-1])
    assert manual.parent == run / "checkpoints" and manual.name.startswith("manual-step-")
    assert manual.suffix == ".ckpt" and manual.is_file()  # acknowledged once the file exists
    return manual


def ended(proc: subprocess.Popen, out: Path) -> str:
    """What the training printed, once it exited 0."""
    assert proc.wait(120) == 0, out.read_text()
    return out.read_text()


@pytest.mark.slow
def test_control_from_the_cli_sigterm_through_lightnings_handler_and_a_resume_into_the_same_run(tmp_path):
    run, proc, out = live_run(tmp_path)
    try:
        pause_resume_checkpoint(run)
        assert "paused at epoch" in steer(run, "pause")  # a signal while paused still stops, with a checkpoint
        proc.send_signal(signal.SIGTERM)
        printed = ended(proc, out)
    finally:
        kill_if_alive(proc)
    assert "SIGTERMException" in printed  # Lightning's own SIGTERM handler ran too: chained, not replaced
    status = RunDir(run).read_status()
    assert status["state"] == "stopped" and status["message"] == "received SIGTERM"
    assert status["interventions"] == {"pauses": 2, "resumes": 2, "checkpoints": 1, "stops": 1}
    assert [a["status"] for a in acks(run)] == ["done"] * 4
    stop_ckpt = next((run / "checkpoints").glob("stop-step-*.ckpt"))
    acc = scalars(run)
    logged = [e.step for e in acc.Scalars("step/loss")]
    dense = HealthConfig().dense_steps  # the run's first optimizer steps each log too
    assert logged[:dense] == list(range(1, dense + 1))
    assert all(s % 4 == 0 for s in logged[dense:])  # one step per optimizer step, read every 4th
    assert {"step/grad_norm", "step/lr"} <= set(acc.Tags()["scalars"])
    stopped_at, done = status["global_step"], status["epochs_done"]

    run_app("lightning", "--logdir", str(tmp_path / "pl"), "--epochs", str(done + 2), "--resume", str(stop_ckpt))
    assert only_run(tmp_path / "pl") == run  # Lightning's logger opened version_1; tbhealth continued
    resumed = RunDir(run).read_status()
    assert resumed["state"] == "completed" and resumed["epochs_done"] == done + 2
    assert resumed["global_step"] > stopped_at
    assert resumed["interventions"]["stops"] == 1  # counted in the stop checkpoint, not lost
    epochs = [e.step for e in scalars(run).Scalars("train/loss")]
    assert epochs == list(range(1, done + 3))  # the stopped epoch was finished once, not twice


@pytest.mark.slow
@pytest.mark.parametrize("where", [("--stop-at", "46"), ("--stop-after-epoch", "2")], ids=["last-step", "between"])
def test_a_run_stopped_at_an_epochs_end_resumes_with_every_epoch_once(tmp_path, where):
    """On an epoch's last step (Lightning resumes in the next epoch: the stopped one still gets its
    point) or between two epochs (the next one is not skipped): every epoch trained and logged once."""
    logdir = tmp_path / "pl"
    run_app("lightning", "--logdir", str(logdir), "--epochs", "3", *where)  # 23 steps per epoch
    run = only_run(logdir)
    stopped = RunDir(run).read_status()
    assert (stopped["state"], stopped["global_step"]) == ("stopped", 46)
    assert stopped["epochs_done"] == (1 if where[0] == "--stop-at" else 2)
    stop_ckpt = next((run / "checkpoints").glob("stop-step-*.ckpt"))
    run_app("lightning", "--logdir", str(logdir), "--epochs", "3", "--resume", str(stop_ckpt))
    resumed = RunDir(run).read_status()
    assert (resumed["state"], resumed["epochs_done"]) == ("completed", 3)
    assert [e.step for e in scalars(run).Scalars("train/loss")] == [1, 2, 3]


@pytest.mark.slow
def test_optimizer_steps_over_accumulated_micro_batches_before_clipping_and_a_planted_nan(tmp_path):
    """What the module saw, micro-batch by micro-batch, against what tbhealth recorded: the loss of
    each optimizer step is the mean of its micro-batches, the epoch's accuracy sums their right
    predictions and sizes, the gradient norm is the one before ``gradient_clip_val``; the NaN
    planted at step 20 raises ``divergence``, whose stop action ends training."""
    logdir, record = tmp_path / "pl", tmp_path / "record.jsonl"
    run_app("lightning", "--logdir", str(logdir), "--epochs", "3", "--accumulate", "2", "--clip", "0.05",
            "--log-every", "1", "--record", str(record), "--nan-at", "20")
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    micro = [r for r in seen if "loss" in r]
    norms = {r["step"]: r["grad_norm"] for r in seen if "grad_norm" in r}
    run = lightning_run(logdir)
    status = stopped_by_divergence(run)
    assert status["batches_per_epoch"] == 12 and status["global_step"] in (20, 21)  # 23 batches, 2 per step

    acc = scalars(run)
    losses = {e.step: e.value for e in acc.Scalars("step/loss")}
    grad_norms = {e.step: e.value for e in acc.Scalars("step/grad_norm")}
    for step in range(1, 20):
        mine = [r["loss"] for r in micro if r["step"] == step]
        assert len(mine) == (1 if step == 12 else 2), step  # the epoch's last window holds one batch
        assert math.isclose(losses[step], sum(mine) / len(mine), rel_tol=1e-5), step
        assert math.isclose(grad_norms[step], norms[step], rel_tol=1e-4), step
    assert max(norms.values()) > 0.05  # clipping cut these: the recorded norms are the ones before it
    epoch1 = [r for r in micro if r["step"] <= 12]
    train_acc = acc.Scalars("train/acc")[0].value
    assert math.isclose(train_acc, sum(r["correct"] for r in epoch1) / sum(r["n"] for r in epoch1), rel_tol=1e-6)
    assert {e.step for e in acc.Scalars("step/lr")} >= set(range(1, 20))


@pytest.mark.slow
def test_two_gloo_processes_obey_the_cli_together(tmp_path):
    run, proc, out = live_run(tmp_path, "--devices", "2")
    try:
        pause_resume_checkpoint(run)
        assert "stopping at epoch" in steer(run, "stop")
        ended(proc, out)
    finally:
        kill_if_alive(proc)
    status = RunDir(run).read_status()
    assert status["state"] == "stopped" and status["world_size"] == 2
    assert status["interventions"] == {"pauses": 1, "resumes": 1, "checkpoints": 1, "stops": 1}
    assert len(list(run.glob("events.out.tfevents.*"))) == 1, "rank 0 alone writes events"
    assert len(list((run / "checkpoints").glob("manual-step-*.ckpt"))) == 1
    records, _ = RunDir(run).read_log()
    ends = {r["rank"]: r["message"] for r in records if r.get("rank") is not None and " at step " in r["message"]}
    assert sorted(ends) == [0, 1] and len({m.split(" at ")[1] for m in ends.values()}) == 1  # same step


@pytest.mark.slow
def test_without_lightning_the_import_names_the_extra():
    message = import_error_without(("lightning", "pytorch_lightning"), "tbhealth.integrations.lightning")
    assert "pip install 'tbhealth[lightning]'" in message, message


def test_frameworks_are_extras_never_base_dependencies():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    frameworks = ("lightning", "transformers", "accelerate", "pytorch-lightning")
    assert not [d for d in project["dependencies"] if d.split("[")[0].split(">")[0].strip() in frameworks]
    extras = project["optional-dependencies"]
    assert extras["lightning"] == ["lightning>=2.2"] and extras["transformers"] == ["transformers[torch]>=4.46"]
    assert set(extras["lightning"] + extras["transformers"]) <= set(extras["test"])  # CI runs these tests

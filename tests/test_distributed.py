"""The same training, monitoring and control under torch.distributed: 2 CPU processes, Gloo."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbhealth.run.rundir import RunDir
from tbhealth.training.config import load_config
from tbhealth.training.registry import build_data, build_loss, build_model
from tests.plugin_helpers import DIGITS, REPO, tbhealth_exe, wait_for, wait_for_state

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def train_cmd(logdir: Path, name: str, *sets: str, nproc: int = 2, resume: bool = False) -> list[str]:
    cmd = [tbhealth_exe(), "train", str(DIGITS), "--logdir", str(logdir), "--name", name, "--quiet"]
    if nproc:
        cmd += ["--nproc-per-node", str(nproc)]
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def rank_ends(run_dir: Path) -> dict[int, str]:
    """What each rank logged about where it ended: ``{rank: "stopped at step N"}``."""
    records, _ = RunDir(run_dir).read_log()
    return {r["rank"]: r["message"].split(" ", 2)[2] for r in records
            if "rank" in r and r["message"].startswith("rank ") and " at step " in r["message"]}


def test_two_processes_one_set_of_events_and_exact_validation(tmp_path):
    r = run(train_cmd(tmp_path, "ddp", "epochs=3"))
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "ddp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1, "only rank 0 writes events"
    acc = events(run_dir)
    for tag in ("train/loss", "val/loss", "val/acc", "lr"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3]
    status = RunDir(run_dir).read_status()
    assert status["state"] == "completed" and status["world_size"] == 2
    assert [r["rank"] for r in status["ranks"]] == [0, 1]
    assert rank_ends(run_dir) == {0: "completed at step 36", 1: "completed at step 36"}
    # validation reduced over ranks equals one process evaluating the whole validation set
    cfg = load_config(DIGITS)
    bundle = build_data(cfg)
    model = build_model(cfg, bundle)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"])
    model.eval()
    x, y = bundle.val.tensors
    with torch.no_grad():
        out = model(x)
        loss = build_loss(cfg)(out, y).item()
        acc_single = (out.argmax(1) == y).float().mean().item()
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(loss, rel=1e-5)
    assert acc.Scalars("val/acc")[-1].value == pytest.approx(acc_single, abs=1e-6)


def test_stop_and_pause_reach_every_rank_at_the_same_step(tmp_path):
    proc = subprocess.Popen(train_cmd(tmp_path, "live", "epochs=100000"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "live"
    try:
        wait_for_state(tmp_path, "live", ("training",), timeout=120)
        wait_for(lambda: RunDir(run_dir).read_status()["global_step"] > 20, 60, "steps")
        r = run([tbhealth_exe(), "pause", str(run_dir)])
        assert r.returncode == 0, r.stderr
        paused = wait_for_state(tmp_path, "live", ("paused",), timeout=20)
        held = paused["global_step"]
        later = wait_for(lambda: (s := RunDir(run_dir).read_status())["updated_at"] > paused["updated_at"] + 1 and s,
                         20, "heartbeats while paused")
        assert later["state"] == "paused" and later["global_step"] == held
        assert run([tbhealth_exe(), "resume", str(run_dir)]).returncode == 0
        wait_for(lambda: RunDir(run_dir).read_status()["global_step"] > held, 30, "steps after resume")
        r = run([tbhealth_exe(), "stop", str(run_dir)])
        assert r.returncode == 0, r.stderr
        assert proc.wait(120) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    status = RunDir(run_dir).read_status()
    assert status["state"] == "stopped"
    ends = rank_ends(run_dir)
    assert set(ends) == {0, 1} and ends[0] == ends[1] == f"stopped at step {status['global_step']}"
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_nan_on_rank_1_raises_divergence_naming_rank_1(tmp_path):
    r = run(train_cmd(tmp_path, "nan", "epochs=2", "model.source=tests.ddp_factories:nan_on_rank",
                      "model.kwargs={}", "logging.every_steps=1", "health.divergence.action=stop"))
    assert r.returncode == 0, r.stdout + r.stderr
    alerts = RunDir(tmp_path / "nan").read_alerts()
    first = alerts[0]
    assert first["rule"] == "divergence" and first["rank"] == 1 and "[rank 1]" in first["message"]
    assert RunDir(tmp_path / "nan").read_status()["state"] == "stopped"
    assert set(rank_ends(tmp_path / "nan")) == {0, 1}


def test_crash_on_rank_1_fails_without_hanging(tmp_path):
    # a hang would outlast the timeout (TimeoutExpired fails the test)
    r = run(train_cmd(tmp_path, "crash", "epochs=3", "model.source=tests.ddp_factories:crash_on_rank",
                      "model.kwargs={}"), timeout=180)
    assert r.returncode != 0
    rd = RunDir(tmp_path / "crash")
    status = wait_for(lambda: (s := rd.read_status()) and s["state"] == "failed" and s, 20, "failed state")
    assert "rank 1" in status["message"] and "deliberate failure on rank 1" in status["message"]
    records, _ = rd.read_log()
    assert any(r.get("rank") == 1 and "Traceback" in r["message"] for r in records)


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_a_two_process_checkpoint(tmp_path, nproc):
    r = run(train_cmd(tmp_path, "rs", "epochs=2"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(train_cmd(tmp_path, "rs", "epochs=4", nproc=nproc if nproc > 1 else 0, resume=True))
    assert r.returncode == 0, r.stdout + r.stderr
    acc = events(tmp_path / "rs")
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 2, 3, 4]
    steps = [e.step for e in acc.Scalars("step/loss")]
    assert steps == sorted(set(steps))
    status = RunDir(tmp_path / "rs").read_status()
    assert status["state"] == "completed" and status["world_size"] == nproc

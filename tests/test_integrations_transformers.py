"""``tbhealth.integrations.transformers.TBHealthCallback`` in real Hugging Face ``Trainer`` runs (CPU,
offline): the tiny BERT of examples/hf_tiny.py built from a config, steered from the real
``tbhealth`` CLI, a planted NaN, a resume from an HF checkpoint into the same run, and the values
checked against the ones the Trainer logs itself."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tbhealth.run.rundir import RunDir
from tests.integration_helpers import (acks, import_error_without, only_run, run_app, scalars, start_app, steer,
                                       stopped_by_divergence, wait_run)

pytestmark = pytest.mark.slow


def hf_run(output_dir: Path) -> Path:
    """Where the callback puts the run: beside the Trainer's own TensorBoard runs."""
    return output_dir / "runs" / "tbhealth"


def test_control_from_the_cli_and_a_resume_into_the_same_run(tmp_path):
    output, out = tmp_path / "hf", tmp_path / "hf.out"
    proc = start_app("hf", out, "--output-dir", str(output), "--epochs", "1000", "--logging-steps", "4",
                     "--step-sleep", "0.01")
    run = hf_run(output)
    try:
        wait_run(run, ("training",), proc, out, timeout=240)
        assert "paused at epoch" in steer(run, "pause")
        assert "resumed at epoch" in steer(run, "resume")
        manual = Path(steer(run, "checkpoint").split()[-1])
        assert manual.parent == output and manual.name.startswith("checkpoint-")
        assert (manual / "trainer_state.json").is_file()  # acknowledged once the Trainer saved it
        assert "stopping at epoch" in steer(run, "stop")
        assert proc.wait(120) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    status = RunDir(run).read_status()
    assert status["state"] == "stopped"
    assert status["interventions"] == {"pauses": 1, "resumes": 1, "checkpoints": 1, "stops": 1}
    assert [a["status"] for a in acks(run)] == ["done"] * 4
    assert (output / f"checkpoint-{status['global_step']}" / "trainer_state.json").is_file()  # the stop's
    stopped_at, done = status["global_step"], status["epochs_done"]

    run_app("hf", "--output-dir", str(output), "--epochs", str(done + 2), "--resume")
    assert only_run(output / "runs") == run
    resumed = RunDir(run).read_status()
    assert resumed["state"] == "completed" and resumed["epochs_done"] == done + 2
    assert resumed["global_step"] > stopped_at and resumed["interventions"]["stops"] == 1
    assert [e.step for e in scalars(run).Scalars("train/loss")] == list(range(1, done + 3))


def test_a_planted_nan_raises_divergence_though_the_trainer_filters_it_from_its_logs(tmp_path):
    output = tmp_path / "hf"
    run_app("hf", "--output-dir", str(output), "--epochs", "2", "--logging-steps", "4", "--nan-at", "6")
    assert stopped_by_divergence(hf_run(output))["global_step"] < 45  # in the first epoch


def test_step_values_are_the_ones_the_trainer_logs(tmp_path):
    """Loss per optimizer step over accumulated micro-batches, and the pre-clip gradient norm,
    equal the Trainer's own ``loss`` and ``grad_norm`` (logged every step here)."""
    output = tmp_path / "hf"
    run_app("hf", "--output-dir", str(output), "--max-steps", "12", "--logging-steps", "1", "--accumulate", "2")
    mine = scalars(hf_run(output))
    theirs = scalars(next(p for p in (output / "runs").iterdir() if p.name != "tbhealth"))
    for tag, their_tag in (("step/loss", "train/loss"), ("step/grad_norm", "train/grad_norm")):
        got = {e.step: e.value for e in mine.Scalars(tag)}
        want = {e.step: e.value for e in theirs.Scalars(their_tag)}
        assert sorted(got) == list(range(1, 13)) and sorted(want) == sorted(got), tag
        for step, value in want.items():
            assert math.isclose(got[step], value, rel_tol=1e-4), (tag, step, got[step], value)
    status = RunDir(hf_run(output)).read_status()
    assert status["state"] == "completed" and status["global_step"] == 12


def test_without_transformers_the_import_names_the_extra():
    message = import_error_without(("transformers",), "tbhealth.integrations.transformers")
    assert "pip install 'tbhealth[transformers]'" in message, message

"""``tbhealth.integrations.transformers.TBHealthCallback`` in real Hugging Face ``Trainer`` runs (CPU,
offline): the tiny BERT of examples/hf_tiny.py built from a config, steered from the real
``tbhealth`` CLI, a planted NaN, a resume from an HF checkpoint into the same run, and the step
and validation values checked against the ones the Trainer logs itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tbhealth.run.rundir import RunDir
from tests.integration_helpers import (acks, import_error_without, kill_if_alive, only_run, run_app, scalars, start_app,
                                       steer, stopped_by_divergence, wait_run)

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
        kept = json.loads((manual / "trainer_state.json").read_text())  # acknowledged once the Trainer saved it
        assert kept["stateful_callbacks"]["TBHealthCallback"]["attributes"]["_saved"]["run_dir"] == str(run.absolute())
        assert "stopping at epoch" in steer(run, "stop")
        assert proc.wait(120) == 0, out.read_text()
    finally:
        kill_if_alive(proc)
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
    mine = scalars(run)
    assert [e.step for e in mine.Scalars("train/loss")] == list(range(1, done + 3))
    # the resumed session's evaluations, as the Trainer logged them (its newest TensorBoard run): two,
    # or one when the stop landed on an epoch's last step (the Trainer resumes in the next epoch and
    # never evaluates the stopped one again; its point has train metrics only)
    theirs = max((scalars(p) for p in (output / "runs").iterdir() if p.name != "tbhealth"),
                 key=lambda acc: acc.FirstEventTimestamp())
    for tag, their_tag in (("val/loss", "eval/loss"), ("val/acc", "eval/accuracy")):
        want = [e.value for e in theirs.Scalars(their_tag)]
        got = [e.value for e in mine.Scalars(tag)][-len(want):]
        assert len(want) in (1, 2) and all(math.isclose(g, w, rel_tol=1e-5) for g, w in zip(got, want, strict=True)), (
            tag, got, want)


def test_step_values_are_the_ones_the_trainer_logs_and_a_planted_nan_raises_divergence(tmp_path):
    """Loss per optimizer step over accumulated micro-batches, the pre-clip gradient norm and the
    learning rate equal the Trainer's own ``loss``, ``grad_norm`` and ``learning_rate`` (logged
    every step here) up to the NaN planted at step 16, which ``divergence`` sees though the
    Trainer's ``logging_nan_inf_filter`` hides it from its own logs; the rule's stop action ends
    training."""
    output = tmp_path / "hf"
    run_app("hf", "--output-dir", str(output), "--epochs", "1", "--logging-steps", "1", "--accumulate", "2",
            "--nan-at", "16")
    run = hf_run(output)
    status = stopped_by_divergence(run)
    assert status["global_step"] in (16, 17) and status["total_steps"] == 23  # 45 batches, 2 per step
    mine, theirs = scalars(run), scalars(next(p for p in (output / "runs").iterdir() if p.name != "tbhealth"))
    for tag, their_tag in (("step/loss", "train/loss"), ("step/grad_norm", "train/grad_norm"),
                           ("step/lr", "train/learning_rate")):
        got = {e.step: e.value for e in mine.Scalars(tag)}
        want = {e.step: e.value for e in theirs.Scalars(their_tag)}
        assert set(range(1, 16)) <= set(got) & set(want), tag
        for step in range(1, 16):
            assert math.isclose(got[step], want[step], rel_tol=1e-4), (tag, step, got[step], want[step])
    assert not math.isfinite(mine.Scalars("step/loss")[-1].value)  # what the Trainer's log filtered out


def test_without_transformers_the_import_names_the_extra():
    message = import_error_without(("transformers",), "tbhealth.integrations.transformers")
    assert "pip install 'tbhealth[transformers]'" in message, message

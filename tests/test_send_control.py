""""Is the run live, then send": one check (``RunDir.send_control``) behind both front ends.

Run directories are written through ``tbhealth.run`` as a trainer does; the CLI runs in this
process (Typer's CliRunner) and the plugin through its pure route function.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tbhealth.run.rundir import RunDir, RunNotLiveError
from tbhealth_cli.app import app
from tbhealth_plugin import api


def run_in(tmp_path, state: str | None) -> RunDir:
    rd = RunDir(tmp_path / "r")
    rd.state_dir.mkdir(parents=True)
    if state:
        rd.write_status({"state": state})
    return rd


@pytest.mark.parametrize("state, why", [("completed", "it finished"), ("failed", "it failed"),
                                        ("stopping", "it is already stopping"), (None, "it has no heartbeat yet")])
def test_a_run_that_is_not_live_is_sent_nothing(tmp_path, state, why):
    rd = run_in(tmp_path, state)
    with pytest.raises(RunNotLiveError) as e:
        rd.send_control("pause", source="test")
    assert (e.value.state, e.value.why) == (state or "unknown", why) and why in str(e.value)
    assert not rd.control_path.exists()
    rd.write_status({"state": "training"})
    rid = rd.send_control("pause", source="test")
    assert [(r.id, r.source) for r in rd.read_control(0)[0]] == [(rid, "test")]


def test_the_cli_says_why_and_what_to_do_next(tmp_path):
    rd = run_in(tmp_path, "completed")
    result = CliRunner().invoke(app, ["stop", str(rd.path)])
    assert result.exit_code == 3
    message = " ".join(result.stderr.split())
    assert "is completed: stop not sent (it finished; start a new run, or continue it with" in message
    assert not rd.control_path.exists()


def test_the_plugin_answers_409_naming_the_state(tmp_path):
    rd = run_in(tmp_path, "failed")
    with pytest.raises(api.ApiError) as e:
        api.control_impl(str(tmp_path), {"run": "r", "command": "checkpoint"}, read_only=False)
    assert e.value.status == 409 and "'r' is failed (it failed)" in e.value.message
    assert not rd.control_path.exists()
    rd.write_status({"state": "paused"})
    answer = api.control_impl(str(tmp_path), {"run": "r", "command": "resume"}, read_only=False)
    assert answer["command"] == "resume" and rd.read_control(0)[0][0].source == "tensorboard"

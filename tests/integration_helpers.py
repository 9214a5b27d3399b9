"""What the framework-integration tests share: start the apps of tests/integration_apps.py, steer
them with the real ``tbhealth`` CLI, read what they wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbhealth.run.rundir import RunDir
from tests.plugin_helpers import REPO, tbhealth_exe, wait_for

APPS = REPO / "tests" / "integration_apps.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def app_cmd(framework: str, *args: str) -> list[str]:
    return [sys.executable, str(APPS), framework, *args]


def run_app(framework: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(app_cmd(framework, *args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=ENV)
    assert proc.returncode == 0, f"{framework} app exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc


def start_app(framework: str, out: Path, *args: str) -> subprocess.Popen:
    """A live training in the background; its output goes to ``out`` (a full pipe would block it)."""
    with open(out, "w") as f:
        return subprocess.Popen(app_cmd(framework, *args), cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def kill_if_alive(proc: subprocess.Popen) -> None:
    """A training a failed test left running: ended, so the next test has the machine."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def wait_run(run: Path, states: tuple[str, ...], proc: subprocess.Popen | None = None, out: Path | None = None,
             timeout: float = 120) -> dict:
    """Wait for the run's status to reach one of ``states``; fail early (with the output) if the
    training process died first."""
    rd = RunDir(run)

    def check():
        if proc is not None and proc.poll() not in (None, 0):
            raise AssertionError(f"training exited {proc.returncode}:\n{out.read_text() if out else ''}")
        s = rd.read_status()
        return s if s and s["state"] in states else None

    return wait_for(check, timeout, f"{run} to reach {states}")


def cli(command: str, run: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """``tbhealth COMMAND RUN --logdir PARENT``: the user's command line, by run name."""
    cmd = [tbhealth_exe(), command, run.name, "--logdir", str(run.parent), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)


def steer(run: Path, command: str) -> str:
    """Send a control command from the CLI and return what it printed; it must be done."""
    proc = cli(command, run, "--timeout", "60")
    assert proc.returncode == 0, f"tbhealth {command} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def scalars(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def acks(run: Path) -> list[dict]:
    return list(RunDir(run).read_acks().values())


def only_run(logdir: Path) -> Path:
    """The one tbhealth run under ``logdir`` (a resume must not have opened a second)."""
    from tbhealth.run.names import list_run_dirs

    runs = list_run_dirs(logdir)
    assert len(runs) == 1, f"expected one run under {logdir}, found {runs}"
    return runs[0]


def stopped_by_divergence(run: Path) -> dict:
    """The run's status, after checking that ``divergence`` fired first and its action stopped it."""
    alerts = RunDir(run).read_alerts()
    assert [a["rule"] for a in alerts if not a.get("resolved")][:1] == ["divergence"], alerts
    status = RunDir(run).read_status()
    assert status["state"] == "stopped" and "divergence" in (status["message"] or ""), status
    return status


def import_error_without(hidden: tuple[str, ...], module: str) -> str:
    """The ImportError message of ``import module`` in a Python where ``hidden`` cannot be imported."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({hidden!r}))\n"
            f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=ENV)
    return proc.stdout + proc.stderr

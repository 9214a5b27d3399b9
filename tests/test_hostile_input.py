"""Issue #11, point 8: bad input to ``tbhealth train`` ends in exit 2 with the reason, never a
traceback or exit 1, never a run marked ``failed``. Every case runs the real CLI in a process of
its own (a few at a time: each spends seconds importing torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tbhealth.run.rundir import RunDir
from tests.test_hostile import TINY

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits.yaml"

BILLION_LAUGHS = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, c in zip(["", *"abcdefgh"], "abcdefghi")
)

# id -> (config text or None for digits.yaml, CLI arguments, fragments stderr must hold)
CASES: dict[str, tuple[str | None, list[str], list[str]]] = {
    "name-300": (None, ["--name", "a" * 300], ["not a valid run name"]),
    "name-dot": (None, ["--name", "."], ["not a valid run name"]),
    "name-hidden": (None, ["--name", ".hidden"], ["not a valid run name"]),
    "name-dash": (None, ["--name=-x"], ["not a valid run name"]),
    "name-slash": (None, ["--name", "a/b"], ["not a valid run name"]),
    "config-name-hidden": ("name: .hidden\n", [], ["name", "plain name"]),
    "logdir-proc": (None, ["--logdir", "/proc/tbhealth-test"], ["cannot create a run folder"]),
    "recursive-anchor": ("model: {source: mlp, kwargs: {hidden: &h [*h]}}\n", [], ["recursive anchor"]),
    "billion-laughs": (BILLION_LAUGHS, [], ["expands to more than"]),
    "deep-yaml": ("x: " + "[" * 5000 + "]" * 5000 + "\n", [], ["nested more than"]),
    "set-recursive": (None, ["--set", "model.kwargs.hidden=&h [*h]"], ["recursive anchor"]),
    "batch-1e23": (None, ["--set", "data.batch_size=1e23"], ["data.batch_size"]),
    "batch-1e12": (None, ["--set", "data.batch_size=1e12"], ["data.batch_size", "16777216"]),
    "seed-2^63": (None, ["--set", f"seed={2**63}"], ["seed"]),
    "seed-negative": (None, ["--set", "seed=-1"], ["seed"]),
    "epochs-huge": (None, ["--set", f"epochs={2**70}"], ["epochs"]),
    "lr-1e400": (None, ["--set", "optimizer.lr=1e400"], ["optimizer.lr", "finite"]),
    "lr-nan": (None, ["--set", "optimizer.lr=.nan"], ["optimizer.lr", "finite"]),
    "grad-clip-inf": (None, ["--set", "grad_clip=.inf"], ["grad_clip", "finite"]),
}
if not torch.cuda.is_available():
    CASES["device-cuda"] = (None, ["--set", "device=cuda"], ["device", "CUDA is not available"])
    CASES["device-cuda-1"] = (None, ["--set", "device=cuda:1"], ["device", "CUDA is not available"])
else:
    CASES["device-cuda-99"] = (None, ["--set", "device=cuda:99"], ["device", "GPU(s): cuda:0 to"])


def train(cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TBHEALTH_LOGDIR": str(cwd / "runs"), "COLUMNS": "400",
           "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "tbhealth_cli.app", "train", *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # one hung case fails alone, not the whole table
        return subprocess.CompletedProcess(cmd, -9, str(e.stdout or ""), f"timed out after {timeout} s")


def unwrap(text: str) -> str:
    return " ".join(text.split())


def assert_usage_error(result: subprocess.CompletedProcess, fragments: list[str]) -> None:
    """Exit 2, no traceback, and each fragment in what the user reads on stderr."""
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in out, out
    for fragment in fragments:
        assert fragment in unwrap(result.stderr), f"{fragment!r} missing from:\n{result.stderr}"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    def run(case_id: str) -> tuple[Path, subprocess.CompletedProcess]:
        text, args, _ = CASES[case_id]
        cwd = tmp_path_factory.mktemp(case_id.replace("^", ""))
        config = cwd / "cfg.yaml"
        config.write_text(text if text is not None else DIGITS.read_text())
        return cwd, train(cwd, str(config), "--set", "epochs=1", *args)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_exits_2_with_the_reason(results, case_id):
    cwd, result = results[case_id]
    assert_usage_error(result, CASES[case_id][2])
    runs = cwd / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "bad input must not leave a run directory"


def test_a_logdir_that_is_a_file_exits_2(tmp_path):
    (tmp_path / "cfg.yaml").write_text(TINY)
    (tmp_path / "afile").write_text("x")
    result = train(tmp_path, "cfg.yaml", "--logdir", str(tmp_path / "afile"))
    assert result.returncode == 2 and "it is a file, not a folder" in unwrap(result.stderr), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_logdir_on_a_read_only_filesystem_exits_2(tmp_path):
    """A read-only tmpfs in a private mount namespace (``unshare``), where the system allows one."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) to make a read-only filesystem")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged mount namespaces are not allowed here: {probe.stderr.decode()[:200]}")
    (tmp_path / "cfg.yaml").write_text(TINY)
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro none {ro} && exec {sys.executable} -m tbhealth_cli.app train "
              f"{tmp_path / 'cfg.yaml'} --logdir {ro / 'runs'}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=240,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Read-only file system" in unwrap(result.stderr) and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- --resume with a changed config

RESUME_CASES = {
    "model": (["--set", "model.kwargs.hidden=[32]"], ["model", "does not match the checkpoint", "fc1.weight is [16, 8] in the checkpoint, [32, 8] now"]),
    "data-shape": (["--set", "data.kwargs.n_features=12"], ["model", "does not match the checkpoint"]),
    "optimizer": (["--set", "optimizer.name=SGD"], ["optimizer.name", "'Adam'"]),
}


@pytest.fixture(scope="module")
def finished_tiny(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("resume-base")
    (cwd / "tiny.yaml").write_text(TINY)
    result = train(cwd, "tiny.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd


@pytest.fixture(scope="module")
def resumed(finished_tiny, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    def run(case_id: str) -> tuple[Path, subprocess.CompletedProcess]:
        cwd = tmp_path_factory.mktemp(f"resume-{case_id}")
        shutil.copytree(finished_tiny, cwd, dirs_exist_ok=True)
        return cwd, train(cwd, "tiny.yaml", "--resume", "--set", "epochs=2", *RESUME_CASES[case_id][0])

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(RESUME_CASES, pool.map(run, RESUME_CASES)))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(RESUME_CASES))
def test_resume_with_a_config_that_no_longer_fits_exits_2_and_leaves_the_run_as_it_was(resumed, case_id):
    cwd, result = resumed[case_id]
    assert_usage_error(result, RESUME_CASES[case_id][1])
    rd = RunDir(cwd / "runs" / "tiny")
    status = rd.read_status()
    assert status["state"] == "completed" and status["total_epochs"] == 1, status
    assert "epochs: 1" in rd.config_path.read_text(), "a refused resume rewrote config.yaml"
    assert not any("ERROR" == json.loads(line).get("level") for line in rd.log_path.read_text().splitlines())

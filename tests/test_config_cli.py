"""Every bad config of tests/test_config.py through the real ``tbhealth train``: exit 2, the key on
stderr, never a traceback (the user made a mistake; the program did not crash)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_config_cases", Path(__file__).with_name("test_config.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
BAD_CONFIGS = _cases.BAD_CONFIGS


def train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TBHEALTH_LOGDIR": str(cwd / "runs"), "COLUMNS": "400", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "tbhealth_cli.app", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """All cases at once, a few processes in parallel: each one spends ~2 s importing torch."""

    def run(case: tuple[str, str, list[str], list[str]]) -> tuple[Path, subprocess.CompletedProcess]:
        case_id, text, overrides, _ = case
        cwd = tmp_path_factory.mktemp(case_id)
        (cwd / "cfg.yaml").write_text(text)
        return cwd, train(cwd, "cfg.yaml", *[arg for o in overrides for arg in ("--set", o)])

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1) + 1) as pool:
        return dict(zip([c[0] for c in BAD_CONFIGS], pool.map(run, BAD_CONFIGS)))


def unwrap(text: str) -> str:
    return " ".join(text.split())  # Rich may wrap long lines; compare whitespace-insensitively


@pytest.mark.parametrize(("case_id", "fragments"), [(c[0], c[3]) for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_cli_rejects_bad_config_with_exit_2(results, case_id, fragments):
    cwd, result = results[case_id]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    err = unwrap(result.stderr)
    for fragment in fragments:
        assert unwrap(fragment) in err, f"{fragment!r} missing from stderr:\n{result.stderr}"
    runs = cwd / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a bad config must not leave a run directory"


def test_cli_missing_config_file(tmp_path):
    result = train(tmp_path, "nope.yaml")
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr

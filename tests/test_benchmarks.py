"""The benchmarks run: the GPU check in its CPU mode, the overhead benchmark's quick mode, and the
plain reference loop trains the same models as the examples it is compared with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tbhealth.training import registry
from tbhealth.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import plain_loop  # noqa: E402


@pytest.mark.parametrize(("example", "make"), [("digits.yaml", plain_loop.mlp), ("digits_cnn.yaml", plain_loop.cnn)])
def test_plain_loop_trains_the_examples_model_on_the_same_split(example, make):
    cfg = load_config(ROOT / "examples" / example)
    bundle = registry.build_data(cfg)
    shapes = [tuple(p.shape) for p in registry.build_model(cfg, bundle).parameters()]
    assert [tuple(p.shape) for p in make().parameters()] == shapes
    train, val = plain_loop.digits(as_images=example == "digits_cnn.yaml")
    assert (train.tensors[0] == bundle.train.tensors[0]).all() and (val.tensors[1] == bundle.val.tensors[1]).all()


def test_gpu_check_runs_on_a_cpu_machine_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["ratio"].startswith("skipped: no CUDA") and results["ddp"].startswith("skipped: no CUDA")
    for key in ("sync_custom_loop", "sync_trainer"):
        part = results[key]
        assert part["ok"] and part["mode_enforced"] is False and "counted, not checked" in part["note"]
        # 1 epoch of 23 steps: steps 5, 10, 15, 20 log (every_steps 5) and 10, 20 sample health
        assert (part["guarded_steps"], part["unguarded_steps"]) == (19, 4)
    assert results["nvml"]["status_system_gpu"] is None and results["nvml"]["direct_reading_gpu"] is None


@pytest.mark.slow
def test_overhead_benchmark_quick_mode_prints_its_tables():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--quick", "--epochs", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "start-up, launch -> first step done" in out and "tbhealth train" in out
    for variant in ("plain loop", "train: defaults", "loop+Monitor: defaults"):
        assert variant in out
    plain_row = next(line for line in out.splitlines() if line.startswith("plain loop"))
    assert plain_row.split()[3] == "1.000"  # the reference divided by itself

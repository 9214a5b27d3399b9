"""The system sampler takes real readings on this machine: psutil numbers, no GPU, a live thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tbhealth.run.schema import validate_status
from tbhealth.monitor.system import SystemProbe, SystemSampler, nvml_target, sample_once, system_scalars

TAGS = {
    "system/cpu_percent", "system/ram_used_gb", "system/disk_read_mbps", "system/disk_write_mbps",
    "system/gpu_memory_used_gb", "system/gpu_utilization_percent",
}


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def _check_snapshot(snap: dict) -> None:
    assert set(snap) == {
        "cpu_percent", "process_cpu_percent", "ram_used_bytes", "ram_total_bytes", "process_rss_bytes",
        "disk_read_bps", "disk_write_bps", "gpu",
    }
    assert 0.0 <= snap["cpu_percent"] <= 100.0
    assert snap["process_cpu_percent"] >= 0.0
    assert 0 < snap["ram_used_bytes"] <= snap["ram_total_bytes"]
    assert 1 << 20 < snap["process_rss_bytes"] < snap["ram_total_bytes"]  # a Python process: > 1 MiB
    for key in ("disk_read_bps", "disk_write_bps"):
        assert snap[key] is None or snap[key] >= 0.0
    if _nvml_works():
        assert snap["gpu"]["memory_total_bytes"] > 0
    else:
        assert snap["gpu"] is None


def test_sample_once_is_sane_and_has_the_status_system_shape():
    snap = sample_once(window=0.2)
    _check_snapshot(snap)
    if psutil.disk_io_counters() is not None:  # this OS has disk counters: rates are measured
        assert snap["disk_read_bps"] is not None and snap["disk_write_bps"] is not None
    # The same dict is what the status file carries under "system": the schema must accept it.
    status = {
        "run": "r", "state": "training", "epoch": 1, "total_epochs": 1, "batch": 0, "batches_per_epoch": 1,
        "global_step": 0, "elapsed_s": 0.0, "eta_s": None, "updated_at": time.time(),
        "metrics": dict.fromkeys(("train_loss", "train_acc", "val_loss", "val_acc", "lr")),
        "system": snap, "alerts_active": 0, "health_score": 100,
        "interventions": {"pauses": 0, "stops": 0, "checkpoints": 0},
    }
    validate_status(status)


def test_process_cpu_percent_sees_a_busy_thread():
    probe = SystemProbe()
    deadline = time.perf_counter() + 0.5
    x = 0
    while time.perf_counter() < deadline:  # one core flat out for half a second
        x += 1
    snap = probe.sample()
    assert snap["process_cpu_percent"] > 30.0, snap
    assert snap["cpu_percent"] > 0.0


def test_sampler_thread_refreshes_and_stops():
    sampler = SystemSampler(interval=0.05)
    first = sampler.latest()  # before start: sampled in this thread, full shape
    _check_snapshot(first)
    sampler.start()
    try:
        thread = next(t for t in threading.enumerate() if t.name == "tbhealth-system")
        assert thread.daemon and sampler.running
        seen = set()
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            seen.add(id(sampler._latest))
            time.sleep(0.02)
        assert len(seen) >= 3, "the thread did not refresh the snapshot"
        _check_snapshot(sampler.latest())
    finally:
        sampler.stop()
    assert not sampler.running and not thread.is_alive()


def test_latest_returns_a_copy_the_caller_may_change():
    with SystemSampler(interval=10) as sampler:
        snap = sampler.latest()
        snap["cpu_percent"] = -1
        assert sampler.latest()["cpu_percent"] >= 0


def test_scalars_use_the_documented_tags_and_units():
    with SystemSampler(interval=10) as sampler:
        snap = sampler.latest()
        scalars = sampler.scalars()
    assert set(scalars) <= TAGS
    assert scalars["system/cpu_percent"] == pytest.approx(snap["cpu_percent"])
    assert scalars["system/ram_used_gb"] == pytest.approx(snap["ram_used_bytes"] / 1e9)
    if snap["gpu"] is None:
        assert not any(tag.startswith("system/gpu") for tag in scalars)


def test_system_scalars_with_a_gpu_reading_and_missing_disk():
    snap = {
        "cpu_percent": 12.5, "ram_used_bytes": 2_000_000_000, "disk_read_bps": None, "disk_write_bps": 3_000_000.0,
        "gpu": {"memory_used_bytes": 40_000_000_000, "utilization_percent": 97.0},
    }
    assert system_scalars(snap) == {
        "system/cpu_percent": 12.5, "system/ram_used_gb": 2.0, "system/disk_write_mbps": 3.0,
        "system/gpu_memory_used_gb": 40.0, "system/gpu_utilization_percent": 97.0,
    }
    assert system_scalars(None) == {}


@pytest.mark.parametrize(
    ("index", "visible", "expected"),
    [
        (0, None, ("index", 0)),
        (1, "", ("index", 1)),
        (0, "3,1", ("index", 3)),
        (1, "3, 1", ("index", 1)),
        (0, "GPU-8f6c1b2e-0000-1111-2222-333344445555", ("uuid", "GPU-8f6c1b2e-0000-1111-2222-333344445555")),
        (1, "0,MIG-abc", ("uuid", "MIG-abc")),
    ],
)
def test_nvml_target_maps_torch_indices_through_cuda_visible_devices(index, visible, expected):
    assert nvml_target(index, visible) == expected


def test_nvml_target_refuses_an_invisible_index():
    with pytest.raises(IndexError, match="CUDA_VISIBLE_DEVICES"):
        nvml_target(2, "0,1")


def test_sampler_never_imports_torch_nor_initialises_cuda():
    code = (
        "import sys, tbhealth.monitor.system as s\n"
        "s.sample_once(window=0)\n"
        "assert 'torch' not in sys.modules, 'sampler imported torch'\n"
        "import torch\n"
        "snap = s.SystemSampler(interval=0.01).start().latest()\n"
        "import time; time.sleep(0.1)\n"
        "assert not torch.cuda.is_initialized(), 'sampler initialised CUDA'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval must be > 0"):
        SystemSampler(interval=0)

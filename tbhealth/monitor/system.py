"""Hardware readings for the status snapshot and the ``system/*`` scalars.

A :class:`SystemSampler` thread takes one set of readings a second so the training loop never
waits on psutil or NVML: the loop only reads the last snapshot (a dict swap, no lock, no I/O).

Why the care taken here:

* System CPU % is computed from our own ``cpu_times`` deltas instead of ``psutil.cpu_percent()``,
  whose interval state is global to the process; user code calling it would skew our numbers.
* NVML indexes physical GPUs and ignores ``CUDA_VISIBLE_DEVICES``; torch's ``cuda:N`` counts only
  the visible ones. :func:`nvml_target` maps one to the other (plain indices and UUIDs).
* torch is consulted only when the training code already imported it *and* initialised CUDA:
  touching ``torch.cuda`` first from this thread would create a context on the wrong thread, cost
  hundreds of MB of GPU memory and seconds of start-up.
* NVML failures (no driver, no GPU, a GPU that fell off the bus) are swallowed once; from then on
  ``gpu`` is ``None`` and everything else keeps working.

Units: bytes and bytes per second in snapshots; the TensorBoard scalars use decimal GB (1e9) and
MB/s (1e6) as their names say. ``process_cpu_percent`` follows ``top``: 100 = one full core.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import psutil

__all__ = ["SystemSampler", "SystemProbe", "sample_once", "system_scalars", "nvml_target", "nvml_handle_for"]


class SystemProbe:
    """Takes readings and remembers the previous counters that rates need. Not thread-safe."""

    def __init__(self, gpu_index: int | None = None):
        self.gpu_index = gpu_index
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # primes the per-process interval
        self._cpu_times = psutil.cpu_times()
        self._disk = _disk_counters()
        self._t = time.monotonic()
        self._nvml: Any = None  # the pynvml module once initialised; False after a failure
        self._gpu_handle: Any = None

    def sample(self) -> dict:
        """One snapshot in the status ``system`` shape; rates cover the time since the last call."""
        now = time.monotonic()
        dt = now - self._t
        self._t = now

        cpu_times = psutil.cpu_times()
        cpu_percent = _busy_percent(self._cpu_times, cpu_times)
        self._cpu_times = cpu_times

        disk = _disk_counters()
        read_bps = write_bps = None
        if disk is not None and self._disk is not None and dt > 1e-3:
            read_bps = max(0.0, (disk[0] - self._disk[0]) / dt)
            write_bps = max(0.0, (disk[1] - self._disk[1]) / dt)
        self._disk = disk

        vm = psutil.virtual_memory()
        try:
            with self._process.oneshot():
                process_cpu = self._process.cpu_percent(None)
                rss = self._process.memory_info().rss
        except psutil.Error:
            process_cpu, rss = 0.0, 0
        return {
            "cpu_percent": round(cpu_percent, 1),
            "process_cpu_percent": round(process_cpu, 1),
            "ram_used_bytes": int(vm.total - vm.available),
            "ram_total_bytes": int(vm.total),
            "process_rss_bytes": int(rss),
            "disk_read_bps": None if read_bps is None else round(read_bps, 1),
            "disk_write_bps": None if write_bps is None else round(write_bps, 1),
            "gpu": self._gpu(),
        }

    def close(self) -> None:
        """Release NVML; a later ``sample()`` initialises it again."""
        self._shutdown_nvml()
        self._nvml = None

    def _shutdown_nvml(self) -> None:
        if self._nvml:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    # -- GPU ------------------------------------------------------------------------------------

    def _gpu(self) -> dict | None:
        if self._nvml is False:
            return None
        try:
            if self._nvml is None:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._gpu_handle = nvml_handle_for(pynvml, self.gpu_index or 0)
            nv = self._nvml
            handle = self._gpu_handle
            name = nv.nvmlDeviceGetName(handle)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            util = nv.nvmlDeviceGetUtilizationRates(handle)
        except Exception:
            # No library, no driver, no device, or it went away: report no GPU from now on.
            self._shutdown_nvml()
            self._nvml = False
            return None
        allocated, reserved = _torch_memory(self.gpu_index or 0)
        return {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_used_bytes": int(mem.used),
            "memory_total_bytes": int(mem.total),
            "utilization_percent": float(util.gpu),
            "torch_allocated_bytes": allocated,
            "torch_reserved_bytes": reserved,
        }


def nvml_target(torch_index: int, visible: str | None) -> tuple[str, int | str]:
    """Which physical GPU torch's ``cuda:torch_index`` is, given ``CUDA_VISIBLE_DEVICES``.

    ``("index", n)`` for an NVML index, ``("uuid", s)`` for a ``GPU-…``/``MIG-…`` id;
    IndexError when the index is not visible.
    """
    if visible is None or not visible.strip():
        return ("index", torch_index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if torch_index < 0 or torch_index >= len(entries):
        raise IndexError(f"cuda:{torch_index} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[torch_index]
    return ("index", int(entry)) if entry.isdigit() else ("uuid", entry)


def nvml_handle_for(pynvml: Any, torch_index: int) -> Any:
    """The NVML handle of torch's ``cuda:torch_index``, honouring ``CUDA_VISIBLE_DEVICES``."""
    kind, key = nvml_target(torch_index, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if kind == "index":
        return pynvml.nvmlDeviceGetHandleByIndex(key)
    return pynvml.nvmlDeviceGetHandleByUUID(key)


def _torch_memory(index: int) -> tuple[int | None, int | None]:
    """The caching allocator's figures, only if the program already initialised CUDA itself."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None, None
    try:
        if not torch.cuda.is_initialized():
            return None, None
        # Explicit index: the current device is per thread, and this is not the training thread.
        return int(torch.cuda.memory_allocated(index)), int(torch.cuda.memory_reserved(index))
    except Exception:
        return None, None


def _busy_percent(before: Any, after: Any) -> float:
    """Share of CPU time that was not idle between two ``psutil.cpu_times()`` readings."""

    def totals(t: Any) -> tuple[float, float]:
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # already in user
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total, idle

    total0, idle0 = totals(before)
    total1, idle1 = totals(after)
    d_total = total1 - total0
    if d_total <= 0:
        return 0.0
    busy = d_total - max(0.0, idle1 - idle0)
    return min(100.0, max(0.0, 100.0 * busy / d_total))


def _disk_counters() -> tuple[int, int] | None:
    try:
        c = psutil.disk_io_counters()
    except Exception:
        return None
    return None if c is None else (c.read_bytes, c.write_bytes)


def sample_once(gpu_index: int | None = None, window: float = 0.1) -> dict:
    """One snapshot without a thread; rates are measured over ``window`` seconds (blocks that long)."""
    probe = SystemProbe(gpu_index)
    time.sleep(max(0.0, window))
    try:
        return probe.sample()
    finally:
        probe.close()


FIRST_READING_S = 0.25
_GB = 1e9
_MB = 1e6


def system_scalars(snapshot: dict | None) -> dict[str, float]:
    """TensorBoard ``system/*`` scalars from a snapshot; readings that are missing are left out."""
    if not snapshot:
        return {}
    out: dict[str, float] = {}

    def put(tag: str, value: Any, scale: float = 1.0) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value) / scale

    put("system/cpu_percent", snapshot.get("cpu_percent"))
    put("system/ram_used_gb", snapshot.get("ram_used_bytes"), _GB)
    put("system/disk_read_mbps", snapshot.get("disk_read_bps"), _MB)
    put("system/disk_write_mbps", snapshot.get("disk_write_bps"), _MB)
    gpu = snapshot.get("gpu") or {}
    put("system/gpu_memory_used_gb", gpu.get("memory_used_bytes"), _GB)
    put("system/gpu_utilization_percent", gpu.get("utilization_percent"))
    return out


class SystemSampler:
    """A daemon thread that refreshes a snapshot every ``interval`` seconds.

    ``gpu_index`` is torch's CUDA index of the device being trained on (``None``: device 0 if
    there is a GPU). ``latest()`` never blocks on the thread; before the first tick it samples
    in the caller's thread once so a snapshot always exists.
    """

    def __init__(self, interval: float = 1.0, gpu_index: int | None = None):
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self._probe = SystemProbe(gpu_index)
        self._probe_lock = threading.Lock()
        self._latest: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SystemSampler:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="tbhealth-system", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None
        with self._probe_lock:
            self._probe.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def sample_now(self) -> dict:
        """Take a reading in the calling thread (also what the thread does each tick)."""
        with self._probe_lock:
            snapshot = self._probe.sample()
        self._latest = snapshot
        return snapshot

    def latest(self) -> dict:
        """The most recent snapshot, in the status ``system`` shape (a copy the caller may keep)."""
        snapshot = self._latest
        if snapshot is None:
            snapshot = self.sample_now()
        out = dict(snapshot)
        if out.get("gpu") is not None:
            out["gpu"] = dict(out["gpu"])
        return out

    def scalars(self) -> dict[str, float]:
        """The latest snapshot as ``system/*`` TensorBoard scalars."""
        return system_scalars(self.latest())

    def __enter__(self) -> SystemSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        # The first reading comes early, so NVML's start-up cost lands here and not in training,
        # yet late enough that its rates (CPU %, disk bytes/s) cover a meaningful window.
        if self._stop.wait(min(self.interval, FIRST_READING_S)):
            return
        while True:
            try:
                self.sample_now()
            except Exception:
                # A reading that fails (a vanished process counter, an OS hiccup) must never end
                # the thread or reach training; the previous snapshot stays current.
                pass
            if self._stop.wait(self.interval):
                return

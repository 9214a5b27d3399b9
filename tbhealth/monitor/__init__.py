"""What a training loop reports to: :class:`Monitor`, and the parts it is made of.

``monitor`` (the object loops call), ``progress`` (what the training thread records),
``controller`` (control requests, pause, stop, signals, health actions), ``control`` (the
control file, polled by ``stat``), ``heartbeat`` (the thread that writes the status),
``events`` (TensorBoard event files), ``system`` (CPU/RAM/disk/GPU readings) and
``reporter`` (the terminal). ``Monitor`` is imported on first use: the system sampler and the
event writer load without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Monitor"]


def __getattr__(name: str) -> Any:
    if name == "Monitor":
        from tbhealth.monitor.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'tbhealth.monitor' has no attribute {name!r}")

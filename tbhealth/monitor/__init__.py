"""What a training loop reports to: :class:`Monitor`, and the parts it is made of.

``monitor`` (the object loops call; it builds the others), ``setup`` (its argument checks and
run folder: new, or the one a resumed state names), ``progress`` (what the training
thread records), ``epoch_sums`` (the epoch's device-side loss sums), ``readings`` (the read-backs
of logging and sampled steps), ``sinks`` (where records go: rank 0's run files and event file,
a do-nothing sink elsewhere; the run's log), ``controller`` (control requests, pause, stop,
signals, health actions), ``control`` (the control file, polled by ``stat``), ``checkpoints``
(the hook that asks the loop for a checkpoint; atomic saves), ``heartbeat`` (the thread that writes the
status), ``watchdog`` (the thread for wall-clock rules and system scalars), ``periodic`` (the
thread both are), ``events`` (TensorBoard event files), ``system`` (CPU/RAM/disk/GPU readings)
and ``reporter`` (the terminal). ``Monitor`` is imported on first use: the system sampler and
the event writer load without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Monitor"]


def __getattr__(name: str) -> Any:
    if name == "Monitor":
        from tbhealth.monitor.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'tbhealth.monitor' has no attribute {name!r}")

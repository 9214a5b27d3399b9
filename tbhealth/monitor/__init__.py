"""What a training loop reports to: :class:`Monitor`, and the parts it is made of.

``monitor`` (the object loops call; it builds the others), ``setup`` (its argument checks and
run folder: new, or the one a resumed state names), ``progress`` (what the training
thread records), ``epoch_sums`` (the epoch's device-side loss sums), ``epoch_metrics`` (an
epoch's reported metrics made plain; accuracies outside 0–1 refused), ``readings`` (the read-backs
of logging and sampled steps), ``sinks`` (where records go: rank 0's run files and event file,
a do-nothing sink elsewhere; the run's log), ``controller`` (control requests, pause, stop,
signals, health actions), ``control`` (the control file, polled by ``stat``), ``checkpoints``
(the hook that asks the loop for a checkpoint; atomic saves), ``heartbeat`` (the thread that writes the
status), ``watchdog`` (the thread for wall-clock rules and system scalars), ``periodic`` (the
thread both are), ``events`` (TensorBoard event files), ``orphans`` (at a resume, the scalars a killed run wrote
after its checkpoint), ``system`` (CPU/RAM/disk/GPU readings)
and ``reporter`` (the terminal). ``Monitor`` is imported on first use: the system sampler and
the event writer load without torch.
"""

from __future__ import annotations

from tbhealth._lazy import lazy_attributes

__all__ = ["Monitor"]

__getattr__ = lazy_attributes(__name__, {"Monitor": ".monitor"}, globals())

"""Checks before a run starts that need torch: is the configured device on this machine.

A config can be valid and still not run here: ``device: cuda`` on a machine without CUDA ends,
found late, as a raw torch error and exit 1; found here it is a
:class:`~tbhealth.training.config.ConfigError` that names the key and the fix (exit 2) before
anything is written. (Whether a ``--resume`` fits its checkpoint is
:func:`tbhealth.training.checkpoint.check_resume`.)
"""

from __future__ import annotations

import torch

from tbhealth.training.config import Config, ConfigError, Problem

def check_device(cfg: Config) -> None:
    """ConfigError when ``cfg.device`` names a GPU this machine does not have."""
    name = cfg.device
    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise ConfigError(Problem("device", f"is {name!r} but CUDA is not available here (torch {torch.__version__} "
                                            f"built {build}); use device: cpu, or auto to take a GPU when there is one"))
    count = torch.cuda.device_count()
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(Problem("device", f"is {name!r} but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}"))


__all__ = ["check_device"]

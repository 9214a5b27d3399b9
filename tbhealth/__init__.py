"""tbhealth: real-time health monitoring and control for PyTorch training, inside TensorBoard.

The public names are imported lazily (PEP 562) so that light users of the package, the
TensorBoard plugin above all, can import ``tbhealth.run`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Monitor": "tbhealth.monitor",
    "Config": "tbhealth.training.config",
    "load_config": "tbhealth.training.config",
    "ConfigError": "tbhealth.training.config",
    "Trainer": "tbhealth.training.trainer",
    "RunDir": "tbhealth.run.rundir",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tbhealth' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

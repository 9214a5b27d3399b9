"""tbhealth: real-time health monitoring and control for PyTorch training, inside TensorBoard.

The public names are imported lazily (PEP 562) so that light users of the package, the
TensorBoard plugin above all, can import ``tbhealth.run`` without importing torch.
"""

from __future__ import annotations

from tbhealth._lazy import lazy_attributes

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


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)

"""The torch side of health checks: hooks and norms that measure a model, and the glue that
feeds their readings and the loop's losses to the pure engine in :mod:`tbhealth.health`."""

from tbhealth.instruments.probes import Instruments
from tbhealth.instruments.watch import HealthWatch

__all__ = ["Instruments", "HealthWatch"]

"""``GET config``: the server's settings, the vocabularies the page needs, and a run's thresholds.

The page spells no state name, metric key or rule threshold of its own: the lists of live and
final states come from :mod:`tbhealth.run.states`, the metric keys from
:mod:`tbhealth.run.status`, the severities from :mod:`tbhealth.health.ids`, and, for a run, the
thresholds from that run's own health settings (``plugins/tbhealth/health.json``, written by the
monitor at start; the documented defaults when a run has none). Change them there and the tab
follows.
"""

from __future__ import annotations

import logging
from typing import Any

from tbhealth.health.ids import SEVERITIES
from tbhealth.run.states import COMMANDS, FINAL_STATES, LIVE_STATES, READ_STATES, STALE_AFTER_S, STATES
from tbhealth.run.status import METRIC_KEYS

from tbhealth_plugin.api import open_run

logger = logging.getLogger(__name__)

#: The GPU-memory bar turns amber this far (a fraction of the device) below the ``memory`` rule's
#: threshold, red above the threshold itself: a warning before the rule fires.
GPU_WARNING_MARGIN = 0.10


def _in_order(states: frozenset[str]) -> list[str]:
    return [s for s in READ_STATES if s in states]


def server_config(*, read_only: bool, reload_interval: Any, logdir_set: bool) -> dict:
    """What every page needs once: server flags and the shared vocabularies."""
    return {
        "read_only": read_only,
        "reload_interval_s": reload_interval,
        "stale_after_s": STALE_AFTER_S,
        "commands": list(COMMANDS),
        "logdir_set": logdir_set,
        # live: can obey controls; running: its heartbeat is current (system readings are live);
        # final: never changes again; all: every state a reader reports
        "states": {"live": _in_order(LIVE_STATES), "running": [s for s in STATES if s not in FINAL_STATES],
                   "final": _in_order(FINAL_STATES), "all": list(READ_STATES)},
        "metric_keys": list(METRIC_KEYS),
        "severities": list(reversed(SEVERITIES)),  # most severe first: the banners' order
    }


def health_settings(stored: dict | None) -> tuple[dict, str]:
    """The run's health settings, validated, and where they came from (``run`` or ``defaults``).

    A file the current version cannot read (hand-edited, from another version) falls back to
    the defaults rather than failing the page; TensorBoard's log says why.
    """
    from tbhealth.health.settings import HealthConfig  # pydantic: imported on first use, not at TB start

    if stored is not None:
        try:
            return HealthConfig.model_validate(stored).model_dump(mode="json"), "run"
        except ValueError as e:
            logger.warning("tbhealth: ignoring unreadable health settings (%s); using the defaults", e)
    return HealthConfig().model_dump(mode="json"), "defaults"


def thresholds(health: dict) -> dict:
    """The numbers the page colours and flags with, from one run's health settings."""
    overfitting, memory = health["overfitting"], health["memory"]
    return {
        "acc_gap_points": round(overfitting["acc_gap"] * 100, 6) if overfitting["enabled"] else None,
        "gpu_memory_critical": memory["max_fraction"],
        "gpu_memory_warning": max(0.0, memory["max_fraction"] - GPU_WARNING_MARGIN),
        "flat_change": health["plateau"]["min_delta"],
        "vanishing_grad_norm": health["vanishing_gradients"]["min_norm"],
        "dead_fraction": health["dead_neurons"]["max_fraction"],
    }


def config_impl(logdir: str | None, run: Any, *, read_only: bool, reload_interval: Any) -> dict:
    """``server_config`` and, with ``run``, that run's ``health`` settings, their ``health_source``
    and the ``thresholds`` derived from them."""
    out = server_config(read_only=read_only, reload_interval=reload_interval, logdir_set=bool(logdir))
    if run is None:
        return out
    rd, name = open_run(logdir, run)
    health, source = health_settings(rd.read_health_settings())
    out.update(run=name, health=health, health_source=source, thresholds=thresholds(health))
    return out


__all__ = ["GPU_WARNING_MARGIN", "server_config", "health_settings", "thresholds", "config_impl"]

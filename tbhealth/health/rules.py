"""Health rules: pure functions from an :class:`Observation` to :class:`Finding` s.

No I/O and no torch here: the engine can be tested on literal histories and reused by anything
that can fill an ``Observation`` (the Monitor, a DDP gather on rank 0, a replay of old logs).

Each rule returns ``None`` when the observation lacks its inputs (it was *not checked* this
round: open alerts of that rule stay open), or one finding (occasionally none): ``firing`` (the
condition holds), ``holding`` (it no longer holds but has not clearly cleared: an open alert stays
open, none begins) or ``clear`` (an open alert resolves, with that finding's message). The
comparison a rule makes and the symbol its message prints come from one table, :class:`Compare`,
so a message shows exactly what was compared.

The rules live by what they read: :mod:`step_rules` (logging windows and sampled steps),
:mod:`epoch_rules` (finished epochs), and here the wall-clock ones (memory, stalled).

Severities: ``critical`` for ``divergence`` (the run is wasted from here on) and ``memory`` (the
next allocation may kill the process); ``warning`` for all others (the run may still recover).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tbhealth.health import settings as hs
from tbhealth.health.epoch_rules import overfitting, plateau, underfitting
from tbhealth.health.findings import (
    CLEAR, Checked, Compare, EpochMetrics, Finding, Observation, banded, episode_key, finding, pct,
)
from tbhealth.health.ids import RuleId
from tbhealth.health.settings import HealthConfig, RuleSettings
from tbhealth.health.step_rules import dead_neurons, divergence, exploding_gradients, loss_spike, vanishing_gradients

__all__ = ["RULES", "Checked", "Compare", "EpochMetrics", "Finding", "Observation", "check", "check_all",
           "episode_key", "evaluate"]


def memory(obs: Observation, s: hs.MemorySettings) -> list[Finding] | None:
    """Default: used GPU memory > 95 % of the device total (used as the driver reports it);
    resolves once <= 90 %."""
    if not obs.gpu_memory_total or obs.gpu_memory_used is None:
        return None
    frac, gib = obs.gpu_memory_used / obs.gpu_memory_total, 2**30
    used = f"{obs.gpu_memory_used / gib:.1f} of {obs.gpu_memory_total / gib:.1f} GiB used ({pct(frac)})"
    fix = "Consider a smaller batch, mixed precision, activation checkpointing, or freeing cached tensors."
    return [banded(obs, s, "memory", frac, Compare.ABOVE, s.max_fraction, s.resolve_fraction,
                   title="GPU memory nearly full", subject=used, bound=pct, fix=fix)]


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
#: Frames of the interpreter's own library and of torch: where a wait happens, rarely why.
_LIBRARY = re.compile(r"[/\\]lib[/\\]python3[^/\\]*[/\\](?!site-packages)|[/\\]site-packages[/\\]torch[/\\]")


def _where(stack: str | None) -> str:
    """'; the training thread is in threading.py:331 (wait), called from model.py:57 (forward)':
    the innermost frame of a formatted Python stack, and the innermost frame of the user's code.
    With every thread's stack (``Thread "name":`` blocks), the first block is the training thread's."""
    frames = _FRAME.findall(re.split(r'\n(?=Thread ")', stack or "")[0])  # the training thread's, listed first
    if not frames:
        return ""
    name = lambda f: f"{f[0].replace(chr(92), '/').rsplit('/', 1)[-1]}:{f[1]} ({f[2]})"  # noqa: E731
    inner = frames[-1]
    own = next((f for f in reversed(frames) if not _LIBRARY.search(f[0])), inner)
    caller = f", called from {name(own)}" if own is not inner else ""
    return f"; the training thread is in {name(inner)}{caller}, stack in the alert and the log"


def stalled(obs: Observation, s: hs.StalledSettings) -> list[Finding] | None:
    """Default: state is ``training`` but no train/val batch finished for 300 s. The alert
    carries the training thread's Python stack (``obs.stack``): where it hangs."""
    if obs.last_progress_time is None:
        return None
    idle, cmp = obs.now - obs.last_progress_time, Compare.ABOVE
    fix = "Check the data loader, a hung distributed collective, or slow storage."
    if obs.state != "training" or not cmp.holds(idle, s.timeout_s):
        what = f"progress again: last step {idle:.0f} s ago <= {s.timeout_s:.0f} s" if obs.state == "training" else (
            f"the run is {obs.state}, not training")
        return [finding(obs, s, "stalled", what, fix, idle, s.timeout_s, status=CLEAR)]
    what = (f"Training stalled: no progress for {idle:.0f} s {cmp.symbol} {s.timeout_s:.0f} s "
            f"(last step {obs.step}){_where(obs.stack)}")
    return [finding(obs, s, "stalled", what, fix, idle, s.timeout_s, stack=obs.stack)]


#: Rule id -> rule function, in priority order (the order of ``RuleId``).
RULES: dict[str, Callable[[Observation, RuleSettings], list[Finding] | None]] = {
    RuleId.DIVERGENCE.value: divergence,
    RuleId.MEMORY.value: memory,
    RuleId.EXPLODING_GRADIENTS.value: exploding_gradients,
    RuleId.VANISHING_GRADIENTS.value: vanishing_gradients,
    RuleId.DEAD_NEURONS.value: dead_neurons,
    RuleId.LOSS_SPIKE.value: loss_spike,
    RuleId.OVERFITTING.value: overfitting,
    RuleId.UNDERFITTING.value: underfitting,
    RuleId.PLATEAU.value: plateau,
    RuleId.STALLED.value: stalled,
}
if tuple(RULES) != tuple(r.value for r in RuleId):  # pragma: no cover - a rule added to one table only
    raise ImportError("tbhealth.health.rules.RULES is out of step with RuleId")


def check(obs: Observation, cfg: HealthConfig) -> tuple[list[Finding], Checked]:
    """Run every enabled rule in priority order.

    Returns the findings that fire or hold, and the rules checked (a :class:`Checked`: a set of
    rule ids whose ``cleared`` maps the episode key of each clear rule to its resolve message).
    """
    findings: list[Finding] = []
    checked = Checked()
    if not cfg.enabled:
        return findings, checked
    for rule_id, rule in RULES.items():
        settings = cfg.rule(rule_id)
        if not settings.enabled:
            continue
        result = rule(obs, settings)
        if result is None:
            continue
        checked.add(rule_id)
        for f in result:
            if f.status == CLEAR:
                checked.cleared[f.key] = f.message
            else:
                findings.append(f)
    return findings, checked


def check_all(observations: Sequence[Observation], cfg: HealthConfig) -> tuple[list[Finding], Checked]:
    """One round over several ranks' observations (DDP, on rank 0): pass the result to a single
    ``AlertTracker.update``. Updating once per rank would resolve the other ranks' alerts."""
    findings: list[Finding] = []
    checked = Checked()
    for obs in observations:
        f, c = check(obs, cfg)
        findings += f
        checked.merge(c)
    return findings, checked


def evaluate(obs: Observation, cfg: HealthConfig) -> list[Finding]:
    """The findings of one round that fire or hold (see :func:`check` for the rules checked)."""
    return check(obs, cfg)[0]

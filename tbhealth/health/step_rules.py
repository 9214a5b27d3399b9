"""Rules over the training steps: the loss and gradient norms of each logging window (every step,
aggregated on the device) and the per-layer readings of sampled steps. Pure: see :mod:`findings`.

Each rule returns ``None`` when its inputs are missing (not checked), else one finding: firing,
holding (not yet clearly cleared) or clear. A per-layer rule makes one finding for the whole
model (one root cause, one alert) listing every affected layer, worst first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from statistics import median

from tbhealth.health import settings as hs
from tbhealth.health.findings import (
    CLEAR, FIRING, HOLDING, Compare, Finding, Observation, banded, finding, finite, fmt, named_layers, pct,
)

ORDER = {FIRING: 0, HOLDING: 1, CLEAR: 2}


def worst(findings: list[Finding | None]) -> list[Finding] | None:
    """The most pressing of several sub-tests' findings (firing, then holding, then clear)."""
    present = [f for f in findings if f is not None]
    return [min(present, key=lambda f: ORDER[f.status])] if present else None


def _window(obs: Observation) -> tuple[str, float] | None:
    """The current window's largest step loss and how a message names it."""
    if not obs.step_losses:
        return None
    step, loss = obs.step_losses[-1]
    if obs.window_start is not None and obs.window_start < step:
        return f"largest step loss of steps {obs.window_start}–{step}", loss
    return f"step {step} loss", loss


def _nonfinite(obs: Observation, s: hs.DivergenceSettings, window: tuple[str, float] | None) -> str | None:
    """What was NaN/Inf this round, in words; None when everything measured was finite."""
    where = f" in steps {obs.window_start}–{obs.step}" if obs.window_start is not None else ""
    if obs.nonfinite == "loss" or (window is not None and not finite(window[1])):
        return f"loss{where}"
    if obs.nonfinite is not None and s.nonfinite_gradients:
        return obs.nonfinite
    latest = obs.epochs[-1] if obs.epochs else None
    if latest is not None and latest.val_loss is not None and not finite(latest.val_loss):
        return "val loss"
    if window is None and latest is not None and latest.train_loss is not None and not finite(latest.train_loss):
        return "train loss"
    return None


def divergence(obs: Observation, s: hs.DivergenceSettings) -> list[Finding] | None:
    """Default: the largest step loss of a logging window > 10 × the initial loss, or NaN/Inf in
    any step's loss (or gradients, or the val loss). Resolves once that loss <= 5 × initial.

    The ratio is judged on step losses; an epoch's train loss only stands in before any step
    was logged. Without an initial loss the ratio is not checked; an initial loss <= 0 (e.g. a
    log-likelihood) skips it for good, and then only NaN/Inf is judged.
    """
    fix = "Consider lowering the learning rate, gradient clipping, or checking inputs for NaN."
    window = _window(obs)
    bad = _nonfinite(obs, s, window)
    if bad is not None:
        return [finding(obs, s, "divergence", f"Training diverged: non-finite (NaN/Inf) {bad}", fix, None, None)]
    latest = obs.epochs[-1] if obs.epochs else None
    if window is None and latest is not None and latest.train_loss is not None:
        window = (f"epoch {latest.epoch} train loss", latest.train_loss)
    init = obs.initial_loss
    if window is None or init is None:
        return None
    subject, loss = window
    if not finite(init) or init <= 0:
        return [finding(obs, s, "divergence", f"{subject} {fmt(loss)} is finite (no positive initial loss to "
                        "compare with)", fix, loss, None, status=CLEAR)]
    return [banded(obs, s, "divergence", loss, Compare.ABOVE, s.factor * init, s.resolve_factor * init,
                   title="Loss diverged", subject=f"{subject} {fmt(loss)}", fix=fix,
                   bound=lambda t: f"{fmt(t / init)} × initial loss {fmt(init)} ({fmt(t)})")]


def exploding_gradients(obs: Observation, s: hs.ExplodingGradientsSettings) -> list[Finding] | None:
    """Default: the window's largest global grad norm > 1e3; or > 10 × the median of the last 20
    windows' norms (5 needed) while above the run's first measured norm. Resolves at half of each."""
    norm = obs.global_grad_norm
    if norm is None or not finite(norm):
        return None  # NaN/Inf gradients are divergence's finding, not a size
    fix = "Consider gradient clipping (torch.nn.utils.clip_grad_norm_) or a lower learning rate."
    subject = f"global grad norm {fmt(norm)}"
    absolute = banded(obs, s, "exploding_gradients", norm, Compare.ABOVE, s.max_norm, s.resolve_norm,
                      title="Exploding gradients", subject=subject, fix=fix)
    recent = [g for g in obs.grad_norm_history[-s.window:] if finite(g)]
    if s.ratio is None or len(recent) < s.min_history or median(recent) <= 0:
        return [absolute]
    med = median(recent)
    floor = s.min_vs_initial * obs.initial_grad_norm if finite(obs.initial_grad_norm) else 0.0
    relative = banded(obs, s, "exploding_gradients", norm if norm > floor else 0.0, Compare.ABOVE,
                      s.ratio * med, s.resolve_ratio * med, title="Exploding gradients", subject=subject, fix=fix,
                      bound=lambda t: f"{fmt(t / med)} × recent median {fmt(med)} ({fmt(t)})")
    return worst([absolute, relative])


def loss_spike(obs: Observation, s: hs.LossSpikeSettings) -> list[Finding] | None:
    """Default: a window's largest step loss > 5 × the median of the 20 windows before it (5
    needed; positive median) and > 0.1 × the initial loss. Resolves at 2.5 × that median."""
    window = _window(obs)
    if window is None:
        return None
    subject, loss = window
    recent = [v for _, v in obs.step_losses[:-1][-s.window:] if finite(v)]
    if not finite(loss) or len(recent) < s.min_history or median(recent) <= 0:
        return None
    med = median(recent)
    init = obs.initial_loss
    floor = s.min_vs_initial * init if finite(init) and init > 0 else 0.0
    fix = "Consider a lower learning rate, warmup, gradient clipping, or checking that batch for bad data."
    return [banded(obs, s, "loss_spike", loss if loss > floor else 0.0, Compare.ABOVE, s.factor * med,
                   s.resolve_factor * med, title="Loss spike", subject=f"{subject} {fmt(loss)}", fix=fix,
                   bound=lambda t: f"{fmt(t / med)} × recent median {fmt(med)} ({fmt(t)})")]


def _per_layer(obs: Observation, s, rule: str, values: Mapping[str, float] | None, cmp: Compare, fire: float,
               release: float, *, has: str, reading: Callable[[float], str], unit: Callable[[float], str],
               fix: str, skip: Callable[[float], bool] = lambda v: False) -> list[Finding] | None:
    """One finding for all layers: fires when any layer passes ``fire``, lists every such layer
    worst first (``layers``); holds while any passes ``release``; else clear. None: not measured."""
    if values is None:
        return None
    ranked = sorted(((k, v) for k, v in values.items() if finite(v) and not skip(v)),
                    key=lambda kv: kv[1], reverse=cmp is Compare.ABOVE)
    fired = tuple(kv for kv in ranked if cmp.holds(kv[1], fire))
    held = tuple(kv for kv in ranked if cmp.holds(kv[1], release))
    neg = cmp.negation.symbol
    if not held:
        best = f" (nearest: '{ranked[0][0]}' {unit(ranked[0][1])})" if ranked else ""
        return [finding(obs, s, rule, f"no layer {has}: every layer {neg} {unit(release)}"
                        f"{best}", fix, ranked[0][1] if ranked else None, release, status=CLEAR)]
    layers, status = (fired, FIRING) if fired else (held, HOLDING)
    name, value = layers[0]
    if status == FIRING:
        what = (f"Layer '{name}' {has}: {reading(value)} {cmp.symbol} {unit(fire)}" if len(layers) == 1 else
                f"{len(layers)} layers {has.replace('has ', 'have ')}, worst '{name}': {reading(value)} "
                f"{cmp.symbol} {unit(fire)} (also {named_layers(layers[1:], unit)})")
    else:
        also = f" (also {named_layers(layers[1:], unit)})" if len(layers) > 1 else ""
        what = (f"Layer '{name}' {has}, not yet cleared: {reading(value)} {neg} {unit(fire)} but "
                f"{cmp.symbol} {unit(release)}{also}")
    return [finding(obs, s, rule, what, fix, value, fire, status=status, layers=layers)]


def vanishing_gradients(obs: Observation, s: hs.VanishingGradientsSettings) -> list[Finding] | None:
    """Default: a layer's grad norm < 1e-7, resolving once every layer's is >= 1e-6. Per layer:
    the first layers of a deep net vanish while the global norm, dominated by the last, looks
    healthy. A norm of exactly 0 is not vanishing: no gradient reaches that layer at all (unused,
    detached, zeroed grads, or behind a layer of dead units, which ``dead_neurons`` reports)."""
    return _per_layer(obs, s, "vanishing_gradients", obs.layer_grad_norms, Compare.BELOW, s.min_norm,
                      s.resolve_norm, has="has vanishing gradients", reading=lambda v: f"grad norm {fmt(v)}",
                      unit=fmt, skip=lambda v: v == 0.0,
                      fix="Consider ReLU/residual connections, normalisation or a different initialisation.")


def dead_neurons(obs: Observation, s: hs.DeadNeuronsSettings) -> list[Finding] | None:
    """Default: > 50 % of an activation layer's units output exactly 0 for every sampled input,
    resolving once every layer is at or below 40 %."""
    return _per_layer(obs, s, "dead_neurons", obs.dead_fraction, Compare.ABOVE, s.max_fraction,
                      s.resolve_fraction, has="has dead units",
                      reading=lambda v: f"{pct(v)} output 0 for every sampled input", unit=pct,
                      fix="Consider a lower learning rate, LeakyReLU/GELU, or a different initialisation or bias.")

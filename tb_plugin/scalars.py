"""Metric series for the Health tab's charts, read from TensorBoard's own data provider.

The plugin never parses event files: TensorBoard has already loaded them (every
``--reload_interval`` seconds), so the charts show exactly what the Scalars tab shows. Learning
rate reductions are derived here, purely, so the page only draws them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tensorboard.data import provider as tb_provider

from tbhealth_plugin.api import ApiError

SCALARS_PLUGIN = "scalars"
#: Series the run page always charts, in display order.
KEY_TAGS = ("train/loss", "val/loss", "train/acc", "val/acc", "lr")
#: Points per series sent to the page; TensorBoard keeps the last point when downsampling.
DOWNSAMPLE = 1000
#: Cap on series per response: a deep net's per-layer health series must not bloat every poll.
MAX_TAGS = 64
#: A drop smaller than this fraction is float noise, not a reduction.
_MIN_DROP = 1e-6
#: Below this many decimals an LR is written out (0.00005); beyond, in e-notation (1.8e-19).
MAX_LR_DECIMALS = 6


def finite_or_none(value: Any) -> float | None:
    """Charts need numbers or gaps: NaN/Inf become null (the status still shows them as text)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def format_lr(value: float) -> str:
    """``0.0005`` not ``5e-04`` (short, and what users typed in their config), but ``1.8e-19``
    where the plain form would need more than ``MAX_LR_DECIMALS`` decimals: never ``0`` for a
    rate that is not zero, however many times a scheduler has cut it."""
    text = f"{value:.6g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        digits = -int(exp) + len(mantissa.replace("-", "").replace(".", "")) - 1
        if 0 <= digits <= MAX_LR_DECIMALS:
            text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        else:
            text = f"{value:.3g}".replace("e-0", "e-").replace("e+0", "e+")
    return text


def lr_reductions(steps: Sequence[int], values: Sequence[float | None]) -> list[dict]:
    """Each epoch where the learning rate fell below the previous epoch's, with its label.

    ``steps`` are epochs (the ``lr`` series is written once per epoch, step = epoch). Increases
    (warm-up) and missing points are not reductions.
    """
    out: list[dict] = []
    prev = None
    for step, value in zip(steps, values):
        if value is None or not math.isfinite(value):
            continue
        if prev is not None and value < prev * (1 - _MIN_DROP):
            out.append({
                "epoch": int(step),
                "from": prev,
                "to": value,
                "label": f"Epoch {int(step)}: LR reduced to {format_lr(value)}",
            })
        prev = value
    return out


def parse_tag_filter(value: str | None) -> list[str] | None:
    """The ``tags`` query parameter: comma-separated exact tags or ``prefix/*``; None when absent."""
    if value is None or not value.strip():
        return None
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    if len(patterns) > MAX_TAGS or any(len(p) > 200 for p in patterns):
        raise ApiError(400, f"parameter 'tags' takes at most {MAX_TAGS} tags of at most 200 characters")
    return patterns


def _matches(tag: str, patterns: Sequence[str]) -> bool:
    return any(tag == p or (p.endswith("/*") and tag.startswith(p[:-1])) for p in patterns)


def pick_tags(tags: Sequence[str], patterns: Sequence[str] | None = None) -> tuple[list[str], int]:
    """Key series first, then the rest by name, at most ``MAX_TAGS``; and how many were left out.

    ``patterns`` (exact tags or ``prefix/*``) narrows the choice: the page asks only for what it
    charts, so a run with hundreds of per-layer series costs it nothing.
    """
    wanted = [t for t in tags if patterns is None or _matches(t, patterns)]
    key = [t for t in KEY_TAGS if t in wanted]
    rest = sorted(t for t in wanted if t not in KEY_TAGS)
    chosen = (key + rest)[:MAX_TAGS]
    return chosen, len(wanted) - len(chosen)


def _ask(data_provider: Any, method: str, ctx: Any, experiment_id: str, run: str,
         tags: Sequence[str] | None = None, **kwargs: Any) -> dict:
    """One call of the data provider about one run's scalar series (all its tags, or ``tags``)."""
    if data_provider is None:
        raise ApiError(503, "TensorBoard has no data provider; scalars are unavailable")
    found = getattr(data_provider, method)(
        ctx, experiment_id=experiment_id, plugin_name=SCALARS_PLUGIN,
        run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=None if tags is None else list(tags)), **kwargs)
    return (found or {}).get(run, {})


def read_series(data_provider: Any, ctx: Any, experiment_id: str, run: str, tags: Sequence[str],
                downsample: int = DOWNSAMPLE) -> dict[str, dict]:
    """``{tag: {steps, values, wall_times}}`` for those of ``tags`` the run has, in ``tags`` order.

    ``run`` must already be validated (``api.open_run``). At most ``downsample`` points per
    series (TensorBoard keeps the last one); non-finite values become None.
    """
    loaded = _ask(data_provider, "read_scalars", ctx, experiment_id, run, tags, downsample=downsample) if tags else {}
    series: dict[str, dict] = {}
    for tag in tags:
        points = loaded.get(tag)
        if points is not None:
            series[tag] = {
                "steps": [p.step for p in points],
                "values": [finite_or_none(p.value) for p in points],
                "wall_times": [p.wall_time for p in points],
            }
    return series


def list_tags(data_provider: Any, ctx: Any, experiment_id: str, run: str) -> list[str]:
    """Every scalar tag TensorBoard has loaded for ``run`` (none before its first reload)."""
    return list(_ask(data_provider, "list_scalars", ctx, experiment_id, run))


def scalars_impl(data_provider: Any, ctx: Any, experiment_id: str, run: str,
                 patterns: Sequence[str] | None = None) -> dict:
    """``{series: {tag: {steps, values, wall_times}}, lr_reductions, omitted}`` for one run.

    ``run`` must already be validated (``api.open_run``). A run TensorBoard has not loaded yet
    has no series: the page shows empty charts until the next reload. ``lr_reductions`` needs
    the ``lr`` series, so it is read whenever ``patterns`` leaves it out.
    """
    available = list_tags(data_provider, ctx, experiment_id, run)
    tags, omitted = pick_tags(available, patterns)
    if "lr" in available and "lr" not in tags:
        tags.append("lr")
    series = read_series(data_provider, ctx, experiment_id, run, tags)
    lr = series.get("lr")
    reductions = lr_reductions(lr["steps"], lr["values"]) if lr else []
    if patterns is not None and not _matches("lr", patterns):
        series.pop("lr", None)
    return {"run": run, "series": series, "lr_reductions": reductions, "omitted": omitted}


__all__ = [
    "KEY_TAGS", "lr_reductions", "format_lr", "parse_tag_filter", "pick_tags", "scalars_impl", "finite_or_none",
    "read_series", "list_tags",
]

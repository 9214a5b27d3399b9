"""Per-layer health series as layer × step grids, for the Health tab's heatmaps (``GET layers``).

The health engine writes, on each sampled step, one scalar per layer and metric:
``health/grad_norm/<layer>`` (gradient L2 norm of a layer with parameters),
``health/dead_units/<layer>`` and ``health/zero_activations/<layer>`` (fractions 0–1 of an
activation layer). TensorBoard's Scalars tab shows them as dozens of separate charts; here they
become one grid per metric, rows in model order, so where a vanishing or dying layer starts is
visible at a glance. Pure functions plus :func:`layers_impl`, which reads through TensorBoard's
data provider like the charts do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tbhealth_plugin.api import ApiError, open_run

#: Metric name -> tag prefix; the order the page offers them in.
LAYER_METRICS = {
    "grad_norm": "health/grad_norm/",
    "dead_units": "health/dead_units/",
    "zero_activations": "health/zero_activations/",
}
#: ``health/grad_norm/global`` is the whole model's norm, not a layer.
GLOBAL_SERIES = "global"
#: Most rows per metric (the first ones in model order are kept; ``omitted_layers`` counts the rest).
MAX_LAYERS = 256
#: Most columns (steps) per grid: a 100k-step run is binned into this many step ranges.
MAX_COLUMNS = 200
_NUMBER = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that puts ``fc2`` before ``fc10`` and ``layers.2`` before ``layers.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _NUMBER.split(name) if part)


def layer_tags(tags: Iterable[str], metrics: Sequence[str] = tuple(LAYER_METRICS)) -> dict[str, dict[str, str]]:
    """``{metric: {layer: tag}}`` for the per-layer tags among ``tags``."""
    out: dict[str, dict[str, str]] = {m: {} for m in metrics}
    for tag in tags:
        for metric in metrics:
            prefix = LAYER_METRICS[metric]
            if tag.startswith(prefix) and len(tag) > len(prefix):
                layer = tag[len(prefix):]
                if not (metric == "grad_norm" and layer == GLOBAL_SERIES):
                    out[metric][layer] = tag
    return out


def model_order(layers: Iterable[str], known: Sequence[str] | None) -> list[str]:
    """``layers`` in the order of ``known`` (the run's own layer list), the rest after them in
    natural name order; all in natural order when the run wrote no list."""
    rank = {name: i for i, name in enumerate(known or ())}
    return sorted(layers, key=lambda n: (rank.get(n, len(rank)), natural_key(n)))


def grid(rows: Sequence[dict], columns: int = MAX_COLUMNS) -> tuple[list[int], list[list[float | None]]]:
    """Align each row's ``{steps, values}`` on one list of steps.

    Every layer of a run is sampled on the same steps, so the union of their steps is usually
    each one's steps. More than ``columns`` steps are binned into equal step ranges: a cell then
    holds the row's last reading in its range and the column is labelled with the range's last
    sampled step. Missing cells are None.
    """
    union = sorted({s for r in rows for s in r["steps"]})
    if len(union) <= columns:
        position = {s: i for i, s in enumerate(union)}.__getitem__
        labels: list[int | None] = list(union)
    else:
        lo, width = union[0], (union[-1] - union[0]) / columns

        def position(step: int) -> int:
            return min(columns - 1, int((step - lo) / width))

        labels = [None] * columns
        for s in union:
            labels[position(s)] = s  # ascending: the last one in the range wins
    values = []
    for r in rows:
        line: list[float | None] = [None] * len(labels)
        for s, v in zip(r["steps"], r["values"]):  # in step order: the last reading in a range wins
            line[position(s)] = v
        values.append(line)
    keep = [i for i, label in enumerate(labels) if label is not None]
    if len(keep) == len(labels):
        return [int(x) for x in labels], values
    return [int(labels[i]) for i in keep], [[line[i] for i in keep] for line in values]


def parse_metrics(value: str | None) -> list[str]:
    """The ``metrics`` query parameter: comma-separated names from ``LAYER_METRICS``; all when absent."""
    if value is None or not value.strip():
        return list(LAYER_METRICS)
    names = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in LAYER_METRICS]
    if unknown:
        raise ApiError(400, f"unknown metric {unknown[0][:40]!r} in 'metrics'; allowed: {', '.join(LAYER_METRICS)}")
    return [m for m in LAYER_METRICS if m in names]


def layers_impl(logdir: str | None, run: Any, list_tags: Callable[[str], list[str]],
                read_series: Callable[[str, Sequence[str], int], dict], metrics: Sequence[str] = tuple(LAYER_METRICS)) -> dict:
    """``{run, order, metrics: {metric: {layers, steps, values}}, omitted_layers}``.

    ``order`` is ``model`` when the run wrote its layer list (``RunDir.write_layers``), else
    ``name`` (natural name order: right for ``fc1, fc2, ..., fc10`` and ``layers.0, layers.1``).
    ``list_tags(run)`` and ``read_series(run, tags, downsample)`` are the data provider's, bound
    to the request. A metric the run has no series for is left out.
    """
    rd, name = open_run(logdir, run)
    known = rd.read_layers()
    by_metric = layer_tags(list_tags(name), metrics)
    out: dict[str, dict] = {}
    omitted = 0
    for metric, tags in by_metric.items():
        layers = model_order(tags, known)
        omitted += max(0, len(layers) - MAX_LAYERS)
        layers = layers[:MAX_LAYERS]
        if not layers:
            continue
        series = read_series(name, [tags[layer] for layer in layers], MAX_COLUMNS)
        rows = [series.get(tags[layer], {"steps": [], "values": []}) for layer in layers]
        steps, values = grid(rows)
        out[metric] = {"layers": layers, "steps": steps, "values": values}
    return {"run": name, "order": "model" if known else "name", "metrics": out, "omitted_layers": omitted}


__all__ = ["LAYER_METRICS", "MAX_LAYERS", "MAX_COLUMNS", "natural_key", "layer_tags", "model_order", "grid",
           "parse_metrics", "layers_impl"]

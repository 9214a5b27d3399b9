"""Rich renderings of run status, alerts and run lists.

``format_*`` build renderables from plain dicts (the status/alert/summary shapes in
``tbhealth.run.schema``) and never print; ``print_*`` show them on a console. Every reader here is
defensive: a status written by an older trainer or a custom loop may lack any field, and a
missing field shows as "—", never as a traceback. Colour carries meaning but never alone: the
words are there too, so ``NO_COLOR`` and piped output read the same.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any, Literal

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tbhealth.run.states import FINAL_STATES, LIVE_STATES
from tbhealth.run.status import METRIC_KEYS, progress_fraction

STATE_COLORS = {
    "training": "green",
    "paused": "yellow",
    "failed": "red",
    "unresponsive": "red",
    "completed": "bright_black",
    "stopped": "bright_black",
    "starting": "blue",
    "stopping": "blue",
}
SEVERITY_COLORS = {"critical": "bold red", "warning": "yellow", "info": "blue"}

#: A change smaller than this share of the value (or, for accuracies, these many points) is "flat".
FLAT_RELATIVE = 1e-3
FLAT_ACC = 1e-3

Trend = Literal["better", "worse", "flat", "none"]
DASH = "—"


# --------------------------------------------------------------------------- small pure helpers


def _num(x: Any) -> float | None:
    """A finite or non-finite float from a JSON value (``"NaN"`` strings included), else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if x in ("NaN", "Infinity", "-Infinity"):
        return float(x.replace("Infinity", "inf"))
    return None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def format_duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None or not math.isfinite(s) or s < 0:
        return DASH
    s = int(round(s))
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_bytes(n: Any) -> str:
    value = _num(n)
    if value is None or not math.isfinite(value):
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return DASH  # unreachable


def format_rate(bps: Any) -> str:
    return DASH if _num(bps) is None else f"{format_bytes(bps)}/s"


def format_time(t: Any, now: float | None = None) -> str:
    """Clock time; the date too when it is not today."""
    ts = _num(t)
    if ts is None or not math.isfinite(ts):
        return DASH
    when = datetime.fromtimestamp(ts)
    today = datetime.fromtimestamp(time.time() if now is None else now).date()
    return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M")


def format_value(name: str, value: Any) -> str:
    v = _num(value)
    if v is None:
        return DASH
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    if name.endswith("acc"):
        return f"{100 * v:.1f}%"
    if name == "lr":
        return f"{v:.2e}"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def higher_is_better(name: str) -> bool | None:
    """By the metric's name: a loss falls, an accuracy rises; None for neither (the lr schedule,
    a metric a custom loop added under another name)."""
    return False if "loss" in name else (True if name.endswith("acc") else None)


def trend(name: str, value: Any, delta: Any) -> Trend:
    """Whether a metric's change since the last epoch is an improvement, by the metric's nature."""
    d, v = _num(delta), _num(value)
    if d is None or not math.isfinite(d):
        return "none"
    better_up = higher_is_better(name)
    tolerance = FLAT_ACC if name.endswith("acc") else FLAT_RELATIVE * abs(v or 0.0)
    if abs(d) <= tolerance:
        return "flat"
    if better_up is None:
        return "none"
    return "better" if (d > 0) == better_up else "worse"


_TREND_STYLE = {"better": "green", "worse": "red", "flat": "yellow", "none": "cyan"}


def format_delta(name: str, value: Any, delta: Any) -> Text:
    """An arrow and the change, coloured by :func:`trend`; accuracies change in points."""
    d = _num(delta)
    if d is None or not math.isfinite(d):
        return Text("")
    t = trend(name, value, delta)
    arrow = "→" if t == "flat" else ("▲" if d > 0 else "▼")
    size = abs(d)  # the arrow carries the sign
    if name.endswith("acc"):
        amount = f"{100 * size:.1f} pt"
    elif name == "lr":
        amount = f"{size:.2e}"
    else:
        amount = f"{size:.4f}"
    return Text(f"{arrow} {amount}", style=_TREND_STYLE[t])


def format_badge(state: Any, pad: bool = True) -> Text:
    state = str(state or "unknown")
    label = f" {state.upper()} " if pad else state.upper()
    return Text(label, style=f"bold white on {STATE_COLORS.get(state, 'magenta')}")


def _bar(fraction: float | None, width: int = 30, style: str = "green") -> RenderableType:
    if fraction is None:
        return Text(DASH)
    grid = Table.grid(padding=(0, 1))
    grid.add_row(
        ProgressBar(total=1.0, completed=fraction, width=width, complete_style=style, finished_style=style),
        Text(f"{100 * fraction:.0f}%"),
    )
    return grid


def format_epoch(status: dict) -> str:
    epoch, total = _int(status.get("epoch")), _int(status.get("total_epochs"))
    batch, per_epoch = _int(status.get("batch")), _int(status.get("batches_per_epoch"))
    text = f"Epoch {DASH if epoch is None else epoch}/{DASH if total is None else total}"
    if batch is not None:
        text += f" – Batch {batch}/{DASH if per_epoch is None else per_epoch}"
    step, total_steps = _int(status.get("global_step")), _int(status.get("total_steps"))
    if total_steps is not None:  # a run planned in optimizer steps
        text += f" – Step {DASH if step is None else step}/{total_steps}"
    return text


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def health_style(score: Any) -> str:
    s = _num(score)
    if s is None:
        return "dim"
    return "green" if s >= 80 else ("yellow" if s >= 50 else "red")


# --------------------------------------------------------------------------- status


def format_metrics(metrics: Any) -> RenderableType:
    metrics = metrics if isinstance(metrics, dict) else {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(justify="right")
    grid.add_column()
    names = list(METRIC_KEYS) + [k for k in metrics if k not in METRIC_KEYS]
    for name in names:
        m = metrics.get(name)
        value, delta = (m.get("value"), m.get("delta")) if isinstance(m, dict) else (None, None)
        grid.add_row(name, format_value(name, value), format_delta(name, value, delta))
    return grid


def format_system(system: Any) -> RenderableType:
    if not isinstance(system, dict):
        return Text("no system readings", style="dim")
    cpu, proc = _num(system.get("cpu_percent")), _num(system.get("process_cpu_percent"))
    lines: list[RenderableType] = []
    cpu_text = f"CPU {DASH if cpu is None else f'{cpu:.0f}%'}"
    if proc is not None:
        cpu_text += f" (this run {proc:.0f}%)"
    ram = f"RAM {format_bytes(system.get('ram_used_bytes'))}"
    if system.get("ram_total_bytes") is not None:
        ram += f" / {format_bytes(system.get('ram_total_bytes'))}"
    if system.get("process_rss_bytes") is not None:
        ram += f" (this run {format_bytes(system.get('process_rss_bytes'))})"
    disk = f"Disk read {format_rate(system.get('disk_read_bps'))}, write {format_rate(system.get('disk_write_bps'))}"
    lines += [Text(cpu_text), Text(ram), Text(disk)]
    lines.append(format_gpu(system.get("gpu")))
    return Group(*lines)


def format_gpu(gpu: Any) -> RenderableType:
    """Name and load on one line, a memory bar under it (red past the ``memory`` rule's 95 %)."""
    if not isinstance(gpu, dict):
        return Text("GPU: no GPU")
    used, total = _num(gpu.get("memory_used_bytes")), _num(gpu.get("memory_total_bytes"))
    frac = used / total if used is not None and total else None
    style = "green" if frac is None or frac < 0.8 else ("yellow" if frac < 0.95 else "red")
    util = _num(gpu.get("utilization_percent"))
    head = Text(f"GPU {gpu.get('name') or '?'} · util {DASH if util is None else f'{util:.0f}%'}")
    grid = Table.grid(padding=(0, 1))
    grid.add_row(Text("   "), _bar(frac, width=20, style=style), Text(f"{format_bytes(used)} / {format_bytes(total)}"))
    lines: list[RenderableType] = [head, grid]
    allocated, reserved = gpu.get("torch_allocated_bytes"), gpu.get("torch_reserved_bytes")
    if _num(allocated) is not None:
        lines.append(Text(f"    torch: {format_bytes(allocated)} allocated, {format_bytes(reserved)} reserved"))
    return Group(*lines)


def format_alert_line(alert: dict) -> Text:
    severity = str(alert.get("severity") or "warning")
    text = Text("  ")
    text.append(f"{severity}", style=SEVERITY_COLORS.get(severity, ""))
    text.append(f" {alert.get('rule', '?')}", style="bold")
    if alert.get("layer"):
        text.append(f" [{alert['layer']}]")
    text.append(f": {alert.get('message', '')}")
    return text


def format_status(status: dict, run: str, alerts: list[dict] | None = None, now: float | None = None) -> Panel:
    """The ``tbhealth status`` panel for one run."""
    now = time.time() if now is None else now
    state = status.get("state", "unknown")
    parts: list[RenderableType] = [Text(format_epoch(status), style="bold")]
    parts.append(_bar(progress_fraction(status)))
    timing = f"Elapsed {format_duration(status.get('elapsed_s'))}"
    if state not in FINAL_STATES:
        timing += f" · ETA {format_duration(status.get('eta_s'))}"
    updated = _num(status.get("updated_at"))
    if updated is not None:
        timing += f" · updated {format_duration(max(0.0, now - updated))} ago"
    parts.append(Text(timing))
    if state == "unresponsive":
        parts.append(Text(
            f"No heartbeat for {format_duration(now - updated) if updated else 'a while'}; "
            f"the trainer last reported '{status.get('reported_state', '?')}'. "
            "It may have been killed or be hung.", style="red"))
    if status.get("message"):
        parts.append(Text(str(status["message"]), style="red" if state == "failed" else ""))

    parts += [Text(""), Text("Metrics", style="bold underline"), format_metrics(status.get("metrics"))]
    parts += [Text(""), Text("System", style="bold underline"), format_system(status.get("system"))]

    score = _num(status.get("health_score"))
    active = [a for a in (alerts or []) if not a.get("resolved")]
    n_active = _int(status.get("alerts_active"))
    n_active = len(active) if n_active is None else n_active
    health = Text("\n")
    health.append("Health ", style="bold")
    health.append(f"{DASH if score is None else f'{score:.0f}'}/100", style=health_style(score))
    health.append(f" · {_plural(n_active, 'active alert')}")
    parts.append(health)
    parts += [format_alert_line(a) for a in active[-5:]]
    if len(active) > 5:
        parts.append(Text(f"  … and {len(active) - 5} more: tbhealth alerts {run}", style="dim"))
    iv = status.get("interventions")
    if isinstance(iv, dict) and any(_int(iv.get(k)) for k in ("pauses", "stops", "checkpoints")):
        counts = ", ".join(_plural(_int(iv.get(k)) or 0, k[:-1]) for k in ("pauses", "stops", "checkpoints"))
        parts.append(Text(f"Interventions: {counts}", style="dim"))

    title = Text.assemble(Text(f" {run} ", style="bold"), format_badge(state))
    return Panel(Group(*parts), title=title, title_align="left", expand=False, padding=(0, 1))


# --------------------------------------------------------------------------- tables


def format_alerts(alerts: list[dict], now: float | None = None) -> Table:
    table = Table(show_lines=False, expand=False)
    for col in ("Time", "Severity", "Rule", "Layer", "Message", "Status"):
        table.add_column(col, overflow="fold")
    for a in sorted(alerts, key=lambda a: _num(a.get("time")) or 0.0):
        severity = str(a.get("severity") or DASH)
        resolved = bool(a.get("resolved"))
        table.add_row(
            format_time(a.get("time"), now),
            Text(severity, style=SEVERITY_COLORS.get(severity, "")),
            Text(str(a.get("rule") or DASH)),  # Text: data is never read as Rich markup
            Text(str(a.get("layer") or DASH)),
            Text(str(a.get("message") or "")),
            Text("resolved", style="dim") if resolved else Text("active", style="bold"),
        )
    return table


def format_runs(summaries: list[dict]) -> Table:
    # No box, like `ps`: eight columns must fit an 80-column terminal beside a long run name,
    # which folds; the other columns keep their width while they can.
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold", expand=False)
    table.add_column("Run", overflow="fold", min_width=10)
    for col, width in (("State", 12), ("Epoch", 5), ("Progress", 9), ("ETA", 6), ("val_loss", 8), ("val_acc", 7), ("Alerts", 6)):
        table.add_column(col, overflow="fold", min_width=width, justify="right" if col in ("val_loss", "val_acc", "Alerts") else "left")
    for s in summaries:
        epoch, total = s.get("epoch"), s.get("total_epochs")
        alerts = s.get("alerts_active")
        table.add_row(
            Text(str(s.get("run"))),
            format_badge(s.get("state"), pad=False),
            f"{DASH if epoch is None else epoch}/{DASH if total is None else total}",
            _bar(_num(s.get("progress")), width=4),
            format_duration(s.get("eta_s")) if s.get("state") in LIVE_STATES else DASH,
            format_value("val_loss", s.get("val_loss")),
            format_value("val_acc", s.get("val_acc")),
            Text(DASH if alerts is None else str(alerts), style="yellow" if alerts else ""),
        )
    return table


# --------------------------------------------------------------------------- printing


def print_status(console: Console, status: dict, run: str, alerts: list[dict] | None = None) -> None:
    console.print(format_status(status, run, alerts))


def print_alerts(console: Console, alerts: list[dict], run: str) -> None:
    if not alerts:
        console.print(Text(f"No alerts for run {run!r}."))
        return
    console.print(format_alerts(alerts))
    active = sum(1 for a in alerts if not a.get("resolved"))
    console.print(f"{_plural(len(alerts), 'alert')}, {active} active.")


def print_runs(console: Console, summaries: list[dict]) -> None:
    console.print(format_runs(summaries))

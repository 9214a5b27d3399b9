"""What the terminal shows: Rich progress bars on a TTY, plain lines elsewhere.

Per-step updates are throttled to ~10 per second so a fast loop pays a time check, not a
redraw. Rich redraws from its own thread.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tbhealth.run.status import METRIC_KEYS

LEVEL_STYLES = {"DEBUG": "dim", "INFO": "", "WARNING": "yellow", "ERROR": "bold red"}


def format_metrics(metrics: dict) -> str:
    """The epoch line on the terminal: ``train_loss=0.1234 train_acc=96.50% ... lr=0.001``."""
    parts = []
    for key in METRIC_KEYS:
        v = metrics.get(key)
        if v is None:
            continue
        if key.endswith("acc"):
            parts.append(f"{key}={v * 100:.2f}%")
        elif key == "lr":
            parts.append(f"lr={v:.3g}")
        else:
            parts.append(f"{key}={v:.4f}")
    return " ".join(parts)


def epoch_of(epoch: int, total: int | None) -> str:
    """``3/10``, or ``3`` for a run planned in steps (no total of epochs)."""
    return f"{epoch}/{total}" if total is not None else str(epoch)


def metrics_line(metrics: dict) -> str:
    """The epoch's metrics in the run's log: ``train_loss=0.1234, ..., lr=0.001`` (NaN spelled out)."""
    values = [(k, metrics.get(k)) for k in METRIC_KEYS]
    return ", ".join(f"{k}={v:.4g}" if math.isfinite(v) else f"{k}={v}" for k, v in values if v is not None)


class Reporter:
    """Terminal output of one run. ``enabled=False`` prints nothing (other ranks, quiet mode)."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(highlight=False)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._overall = self._batches = None
        self._next_draw = 0.0
        self._postfix = ""

    def start(self, run_dir: str, total_epochs: int | None, epochs_done: int) -> None:
        if not self.enabled:
            return
        self.console.print(f"[bold]tbhealth[/] run [cyan]{run_dir}[/]")
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[postfix]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console, refresh_per_second=8,
            )
            self._overall = self._progress.add_task("epochs ", total=total_epochs, completed=epochs_done, postfix="")
            self._batches = self._progress.add_task("batches", total=1, postfix="")
            self._progress.start()

    def epoch_started(self, epoch: int, batches: int | None) -> None:
        if self._progress is not None:
            self._progress.reset(self._batches, total=batches or 1, postfix="")

    def step(self, batch: int, loss: float | None = None) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if now >= self._next_draw:  # format and redraw ~10 times a second, not every step
            self._next_draw = now + 0.1
            if loss is not None:
                self._postfix = f"loss {loss:.4f}"
            self._progress.update(self._batches, completed=batch, postfix=self._postfix)

    def epoch_finished(self, epoch: int, total: int | None, metrics: dict, seconds: float) -> None:
        if not self.enabled:
            return
        line = f"epoch {epoch_of(epoch, total)} {format_metrics(metrics)} ({seconds:.1f}s)"
        if self._progress is not None:
            acc = metrics.get("val_acc")
            post = f"val_loss {metrics.get('val_loss', float('nan')):.4f}" + (f" val_acc {acc * 100:.1f}%" if acc is not None else "")
            self._progress.update(self._overall, completed=epoch, postfix=post)
            self._progress.console.print(line)
        else:
            self.console.print(line, soft_wrap=True)

    def log(self, level: str, message: str) -> None:
        if not self.enabled:
            return
        self.console.print(Text(f"{level:<7} {message}", style=LEVEL_STYLES.get(level, "")), soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

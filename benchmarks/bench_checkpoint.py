"""What checkpoints cost training: per-epoch time of the config-driven Trainer with its
end-of-epoch checkpoints on and off.

One process, the real ``Trainer`` (``tbhealth train``'s code path, no CLI start-up), one torch
thread, the built-in digits data. Variants, run interleaved in a rotating order so that a busy
phase of a shared machine hits each alike:

* ``off``: the Trainer with its end-of-epoch checkpoints skipped (``_epoch_checkpoints`` a no-op
  in a subclass): the baseline;
* ``on``: as shipped, with ``checkpoint.every_epochs: 1``: ``best`` (when val loss improved),
  ``epoch-N`` and ``last`` at every epoch's end.

Two models: the digits example's MLP (hidden 128-64, a 0.24 MB checkpoint: start-up-sized) and a
wide MLP (hidden 1536-1536, ~2.5 M parameters, a 30 MB checkpoint with Adam's state), where the
write is long enough to matter. Per-epoch time is wall time between the ends of consecutive
epochs (validation and checkpoints included); "on/off" is the median of per-round ratios.
"snapshot" is the training thread's time inside ``Trainer.save_checkpoint`` per epoch (the
whole ``torch.save`` before; the host copy after), "saves" the checkpoint calls per epoch.

The same script measures any tbhealth version: run it with that version's interpreter
(``before``: main's synchronous ``torch.save``; ``after``: the background writer).

    python benchmarks/bench_checkpoint.py           # 5 rounds x 6 epochs per model and variant
    python benchmarks/bench_checkpoint.py --quick   # 2 rounds x 3 epochs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tbhealth.run.names import unique_run_dir
from tbhealth.training.config import load_config
from tbhealth.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
MODELS = {"digits MLP 128-64": "[128, 64]", "wide MLP 1536-1536": "[1536, 1536]"}
VARIANTS = ("off", "on")


class Timed(Trainer):
    """The shipped Trainer, timing each epoch's end and its own time in ``save_checkpoint``."""

    checkpoints = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_ends: list[float] = []
        self.snapshot_s = 0.0
        self.saves = 0

    def end_epoch(self, epoch: int) -> None:
        super().end_epoch(epoch)
        self.epoch_ends.append(time.perf_counter())

    def save_checkpoint(self, kind, monitor_state):
        t0 = time.perf_counter()
        try:
            return super().save_checkpoint(kind, monitor_state)
        finally:
            self.snapshot_s += time.perf_counter() - t0
            self.saves += 1

    def _epoch_checkpoints(self, epoch, metrics):
        if self.checkpoints:
            super()._epoch_checkpoints(epoch, metrics)


class Off(Timed):
    checkpoints = False


def one_run(logdir: Path, hidden: str, variant: str, epochs: int) -> dict:
    cfg = load_config(REPO / "examples" / "digits.yaml", [
        f"epochs={epochs}", f"model.kwargs.hidden={hidden}", "checkpoint.every_epochs=1", "checkpoint.keep_last=2",
        "seed=0", "health.enabled=false"])
    trainer = (Timed if variant == "on" else Off)(cfg, unique_run_dir(logdir, variant), verbose=False)
    t0 = time.perf_counter()
    trainer.fit()
    ends = [t0, *trainer.epoch_ends]
    per_epoch = [b - a for a, b in zip(ends[1:], ends[2:])]  # the first epoch also pays warm-up
    return {"epoch_s": statistics.median(per_epoch), "snapshot_s": trainer.snapshot_s / epochs,
            "saves": trainer.saves / epochs,
            "size_mb": sum(p.stat().st_size for p in trainer.run.checkpoint_dir.glob("last.pt")) / 1e6}


def bench(rounds: int, epochs: int) -> None:
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f}; {rounds} rounds x {epochs} epochs\n")
    print("| model | variant | s/epoch | on/off | snapshot ms/epoch | saves/epoch | last.pt MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for model, hidden in MODELS.items():
            results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for r in range(rounds):
                for variant in VARIANTS[r % 2:] + VARIANTS[:r % 2]:
                    results[variant].append(one_run(Path(tmp) / f"{r}", hidden, variant, epochs))
            ratio = statistics.median(on["epoch_s"] / off["epoch_s"] for on, off in zip(results["on"], results["off"]))
            for variant in VARIANTS:
                rs = results[variant]
                med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
                shown = f"{ratio:.3f}" if variant == "on" else "1"
                print(f"| {model} | {variant} | {med['epoch_s']:.3f} | {shown} | {med['snapshot_s'] * 1e3:.1f} | "
                      f"{med['saves']:.1f} | {med['size_mb'] if variant == 'on' else 0:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 epochs (a smoke run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    rounds, epochs = (2, 3) if args.quick else (args.rounds, args.epochs)
    bench(rounds, epochs)


if __name__ == "__main__":
    main()

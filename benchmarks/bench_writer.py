"""Cost of logging scalars: torch's SummaryWriter against tbhealth's EventWriter.

What matters to training is the time the *calling* thread spends per scalar, so that is the
headline figure ("caller"), measured as wall time around the logging calls, plus the same
thread's CPU time. Because EventWriter defers encoding to a background thread, the table also
gives the end-to-end figure: calls plus ``flush()`` until every record is in the file, so no
cost is hidden on the other thread. Variants run interleaved, in a rotating order, in one
process, and each segment is flushed before the next starts; figures are medians.

    python benchmarks/bench_writer.py          # about half a minute
    python benchmarks/bench_writer.py --quick  # a few seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tensorboard
import torch
from torch.utils.tensorboard import SummaryWriter

from tbhealth.monitor.events import EventWriter, masked_crc32c

TAGS = [f"layer{i:02d}/grad_norm" for i in range(20)]


def summary_writer_per_scalar(writer: SummaryWriter, steps: range) -> None:
    for step in steps:
        for i, tag in enumerate(TAGS):
            writer.add_scalar(tag, step * 0.001 + i, step)


def event_writer_per_scalar(writer: EventWriter, steps: range) -> None:
    for step in steps:
        for i, tag in enumerate(TAGS):
            writer.scalars(step, {tag: step * 0.001 + i})


def event_writer_20_per_call(writer: EventWriter, steps: range) -> None:
    for step in steps:
        writer.scalars(step, {tag: step * 0.001 + i for i, tag in enumerate(TAGS)})


def measure(log: Callable, writer, steps: range) -> tuple[float, float, float]:
    """(caller wall, caller CPU, end to end) in µs per scalar."""
    n = len(steps) * len(TAGS)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    log(writer, steps)
    wall1, cpu1 = time.perf_counter(), time.thread_time()
    writer.flush()
    wall2 = time.perf_counter()
    return tuple(1e6 * x / n for x in (wall1 - wall0, cpu1 - cpu0, wall2 - wall0))


def crc_cost(sizes: tuple[int, ...] = (12, 120, 1200, 12000), reps: int = 7, calls: int = 2000) -> dict[int, float]:
    """Median µs per ``masked_crc32c`` call for payloads of each size (the writer thread's CRC work)."""
    out = {}
    for size in sizes:
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                masked_crc32c(data)
            times.append((time.perf_counter() - t0) / calls * 1e6)
        out[size] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    args = parser.parse_args()
    reps, steps_per_rep = (3, 100) if args.quick else (7, 1000)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        variants = {
            "SummaryWriter.add_scalar, 1 per call": (
                summary_writer_per_scalar, SummaryWriter(str(root / "sw"), flush_secs=1)),
            "EventWriter.scalars, 1 per call": (
                event_writer_per_scalar, EventWriter(root / "ew1", flush_secs=1)),
            "EventWriter.scalars, 20 per call": (
                event_writer_20_per_call, EventWriter(root / "ew20", flush_secs=1)),
        }
        names = list(variants)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
        step = 0
        for rep in range(reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotate order
                log, writer = variants[name]
                results[name].append(measure(log, writer, range(step, step + steps_per_rep)))
            step += steps_per_rep
        for _, writer in variants.values():
            writer.close()

    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"tensorboard {tensorboard.__version__}, {platform.processor() or platform.machine()}")
    print(f"{reps} interleaved repetitions x {steps_per_rep * len(TAGS)} scalars per variant; "
          "medians in µs per scalar\n")
    baseline = statistics.median(r[0] for r in results[names[0]])
    header = f"{'variant':40} {'caller':>8} {'caller CPU':>11} {'end to end':>11} {'vs SW':>7}"
    print(header)
    print("-" * len(header))
    for name in names:
        caller, cpu, e2e = (statistics.median(r[i] for r in results[name]) for i in range(3))
        print(f"{name:40} {caller:8.2f} {cpu:11.2f} {e2e:11.2f} {baseline / caller:6.1f}x")
    print("\nrecord CRC (masked CRC-32C), median µs per call:")
    for size, us in crc_cost(reps=3 if args.quick else 7).items():
        print(f"  {size:6d} bytes  {us:8.2f}")


if __name__ == "__main__":
    main()

"""What the run-state writer costs training: the same loop with the heartbeat on and off.

One process, a bare training loop (small MLP, synthetic data, ``torch.set_num_threads(1)``)
reporting to a real ``tbhealth.Monitor``. Variants, run interleaved in a rotating order:

* ``bare``: the loop without a Monitor (context: what ``Monitor.step`` itself costs);
* ``off``: ``Monitor(system_metrics=False, heartbeat_s=3600)``: no sampler, and the heartbeat
  and watchdog threads never come round in the timed steps: status written at start and close;
* ``on 1s``: the Monitor as shipped: heartbeat thread (status JSON written atomically),
  watchdog thread (wall-clock health rules, system scalars every 5 s) and system sampler
  thread, each every second (``heartbeat_s=1``);
* ``on 0.1s``: ``heartbeat_s=0.1``: the three threads ten times as often, to make their cost
  visible.

Figures are medians over repetitions of µs per training step, wall time and the training
thread's CPU time; "vs off" is the median of the per-round ratios (each round runs every
variant once, so slow phases of a shared machine hit all variants alike). The last table
times one tick of each thread directly, through the same public classes the Monitor builds
(``Heartbeat.write()``: build and write the status; ``Watchdog.tick()``: memory and stalled
rules, system scalars when due).

    python benchmarks/bench_heartbeat.py           # 12 rounds x 3000 steps, ~2 min
    python benchmarks/bench_heartbeat.py --quick   # 3 rounds x 500 steps
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
from torch import nn

from tbhealth import Monitor
from tbhealth.instruments.watch import HealthWatch
from tbhealth.monitor.heartbeat import Heartbeat
from tbhealth.monitor.progress import Progress
from tbhealth.monitor.sinks import RunSink
from tbhealth.monitor.system import SystemSampler
from tbhealth.monitor.watchdog import Watchdog
from tbhealth.run.rundir import RunDir

HEARTBEAT_S = {"off": 3600.0, "on 1s": 1.0, "on 0.1s": 0.1}

VARIANTS = ("bare", "off", "on 1s", "on 0.1s")
BATCH, FEATURES, CLASSES = 64, 64, 10


def make_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(torch.randn(BATCH, FEATURES, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
               for _ in range(32)]
    return model, opt, batches


def open_monitor(variant: str, logdir: Path, model, opt, health) -> Monitor:
    mon = Monitor(logdir, variant.replace(" ", "-").replace(".", ""), total_epochs=1, model=model, optimizer=opt,
                  verbose=False, handle_signals=False, system_metrics=variant != "off", health=health,
                  heartbeat_s=HEARTBEAT_S[variant])
    return mon.start()


def train(variant: str, steps: int, warmup: int, logdir: Path, task, health) -> tuple[float, float]:
    """(wall µs, training-thread CPU µs) per step over ``steps`` timed steps."""
    model, opt, batches = task
    loss_fn = nn.CrossEntropyLoss()
    mon = None if variant == "bare" else open_monitor(variant, logdir, model, opt, health)
    if mon is not None:
        mon.start_epoch(1, steps + warmup)
    try:
        for i in range(steps + warmup):
            if i == warmup:
                wall0, cpu0 = time.perf_counter(), time.thread_time()
            x, y = batches[i % len(batches)]
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            if mon is not None:
                mon.step(loss, n=BATCH, correct=(out.argmax(1) == y).sum())
            opt.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    finally:
        if mon is not None:
            mon.end_epoch(val_loss=1.0, val_acc=0.5)
            mon.close()
    return 1e6 * wall / steps, 1e6 * cpu / steps


def beat_cost(logdir: Path, task, health, n: int = 200) -> dict[str, float]:
    """Median µs of one status write (``Heartbeat.write``) and one watchdog tick, wall and
    calling-thread CPU (the write's ``rename`` waits on the disk without the GIL)."""
    model, _, _ = task
    run = RunDir(logdir / "ticks")
    progress = Progress(run="ticks", total_epochs=1, state="training", epoch=1, batches_per_epoch=100)
    sink = RunSink(run)
    watch = HealthWatch(health, model=model) if health is not False else None
    system = SystemSampler()
    parts = {
        "beat": Heartbeat(progress, sink, run, health=watch, system=system, distributed=False).write,
        "watchdog": Watchdog(progress, sink, health=watch, system=system, record=lambda events: None).tick,
    }
    out: dict[str, list[float]] = {f"{name} {kind}": [] for name in parts for kind in ("wall", "CPU")}
    sink.open({})
    try:
        for name, fn in parts.items():
            for _ in range(n):
                w0, c0 = time.perf_counter(), time.thread_time()
                fn()
                out[f"{name} wall"].append(time.perf_counter() - w0)
                out[f"{name} CPU"].append(time.thread_time() - c0)
    finally:
        sink.close(0, "completed")
        system.stop()
    return {k: 1e6 * statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3000, help="timed steps per variant per round")
    ap.add_argument("--no-health", action="store_true", help="Monitor(health=False) in every variant")
    ap.add_argument("--quick", action="store_true", help="3 rounds x 500 steps")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 500
    torch.set_num_threads(1)
    health = False if args.no_health else None
    task = make_task()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, 1 torch thread, health checks {'off' if args.no_health else 'on (defaults)'}; "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-heartbeat-") as tmp:
        logdir = Path(tmp)
        train("on 1s", 200, 50, logdir, task, health)  # warm up torch and the imports
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                w, c = train(v, args.steps, 50, logdir, task, health)
                wall[v].append(w)
                cpu[v].append(c)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {wall[v][-1]:.0f}" for v in VARIANTS) + " µs/step",
                  flush=True)
        beat = beat_cost(logdir, task, health)
    print(f"load average {os.getloadavg()[0]:.1f} at end\n")
    print(f"Training step, µs ({args.rounds} rounds x {args.steps} steps per variant; medians):")
    print("| variant | wall | CPU (training thread) | wall vs off (median of round ratios) | IQR of ratios |")
    print("|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        ratios = [a / b for a, b in zip(wall[v], wall["off"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(f"| {v} | {statistics.median(wall[v]):.1f} | {statistics.median(cpu[v]):.1f} | "
              f"{statistics.median(ratios):.4f} | {q[0]:.4f}–{q[2]:.4f} |")
    print("\nOne tick of each thread, µs (median of 200, timed on the calling thread):")
    print("| | wall | CPU |")
    print("|---|---:|---:|")
    print(f"| status write (`Heartbeat.write()`) | {beat['beat wall']:.0f} | {beat['beat CPU']:.0f} |")
    print(f"| wall-clock rules, system scalars when due (`Watchdog.tick()`) | {beat['watchdog wall']:.0f} | "
          f"{beat['watchdog CPU']:.0f} |")
    both = beat["beat CPU"] + beat["watchdog CPU"]
    print(f"\nCPU per second of training: {both / 1e4:.3f} % of a core at 1 tick/s, {both / 1e3:.2f} % at 10 ticks/s.")


if __name__ == "__main__":
    main()

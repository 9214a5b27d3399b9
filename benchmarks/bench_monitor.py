"""What ``tbhealth.Monitor`` costs a training loop: the same loop bare and reporting to a Monitor.

Variants, measured in ONE process with interleaved repetitions in a rotating order (ABC, BCA,
CAB, ...) so that a slow spell of the machine hits every variant alike:

- ``bare``: forward, loss, backward, ``optimizer.step()``, ``zero_grad()``; it also computes the
  batch's correct count, the loop's own work that ``Monitor.step`` takes as input.
- ``default``: the same loop plus ``Monitor.step(loss, n=, correct=)`` at the Monitor's defaults:
  health checks on (activations/gradients sampled every 50 steps), ``log_every=50``, system
  metrics on (sampler thread), heartbeat thread, event writer thread.
- ``every step``: every instrument on every step: ``health.every_steps=1``, ``log_every=1``.

Each repetition opens a fresh Monitor (its threads run during the timed steps, as in a real run;
opening and closing are not timed), then times every step on its own. Figures, per variant:

- ``ms/step``: the mean step time of a repetition (so it includes the periodic logging and
  sampled steps), median over repetitions. This is the overhead a run pays. Its ``overhead``
  is paired: variant / bare within each rotation, median over rotations.
- ``median step``: the median single step (a step that neither logs nor samples).
- ``CPU ms/step``: process CPU time per step over a repetition (every thread, the Monitor's
  background threads included), median over repetitions (overhead paired likewise). Much less
  sensitive than wall time to other processes competing for the cores; it counts background
  work even when a spare core absorbs it.

Synthetic in-memory batches (no DataLoader), ``torch.set_num_threads(1)``: one intra-op thread
makes small CPU steps stable and leaves the second core to the Monitor's background threads, as
a GPU run leaves the host's cores. ``verbose=False``: no terminal progress bar (Rich redraws from
its own thread).

    python benchmarks/bench_monitor.py            # 21 repetitions; about 3 minutes on an idle 2-core CPU
    python benchmarks/bench_monitor.py --quick    # 3 repetitions of fewer steps, about 20 s
    python benchmarks/bench_monitor.py --profile  # cProfile of Monitor.step at defaults (MLP)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tbhealth import Monitor

VARIANTS: dict[str, dict | None] = {
    "bare": None,
    "default": {},
    "every step": {"health": {"every_steps": 1}, "log_every": 1},
}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


#: name -> (model factory, batch size, timed steps per repetition: full, quick); inputs are 1x28x28,
#: ten classes. Multiples of 100 steps: every repetition holds the same logging and sampled steps;
#: short repetitions interleave finely, so drifts of the machine's speed hit all variants alike.
WARM_STEPS = 100  # per Monitor segment, before timing (see segment())
MODELS = {
    "MLP 784-512-512-10, batch 64": (mlp, 64, 400, 200),
    "CNN conv16-conv32-linear, batch 64": (cnn, 64, 100, 100),
}


def batches(batch_size: int, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 1, 28, 28, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(n)]


class Subject:
    """The model, optimizer and data that every variant trains, one segment after another.

    One shared model, not one identically seeded copy per variant: with copies, the CNN's
    "default" copy ran ~10 % slower than the bare one in every step (two runs), while one model
    alternating with and without a Monitor showed no difference. Step times also drift by up to
    1.5x between segments; consecutive segments of one model see the drift alike.
    """

    def __init__(self, factory, batch_size: int):
        torch.manual_seed(0)
        self.model = factory()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.data = batches(batch_size)
        self.loss_fn = nn.CrossEntropyLoss()

    def monitor(self, settings: dict | None, logdir: Path, name: str) -> Monitor | None:
        if settings is None:
            return None
        return Monitor(logdir, name, total_epochs=1, model=self.model, optimizer=self.opt, verbose=False,
                       handle_signals=False, **settings)

    def run(self, steps: int, mon: Monitor | None) -> list[float]:
        """Seconds per step, each step timed on its own."""
        model, opt, loss_fn, data = self.model, self.opt, self.loss_fn, self.data
        times = []
        for i in range(steps):
            x, y = data[i % len(data)]
            t0 = time.perf_counter()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            correct = (out.argmax(1) == y).sum()
            if mon is not None:
                mon.step(loss, n=len(x), correct=correct)
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times


def segment(subject: Subject, settings: dict | None, steps: int, logdir: Path, name: str
            ) -> tuple[list[float], float]:
    """Per-step wall times, and the process's CPU seconds per step (every thread: the Monitor's too)."""
    mon = subject.monitor(settings, logdir, name)
    if mon is not None:
        mon.start()
        mon.start_epoch(1, steps + WARM_STEPS)
        # Untimed: the threads' start-up (first system sample, NVML/psutil set-up, the event file's
        # creation) is paid once per run, not per step; a real run amortises it over minutes.
        # A multiple of 100 steps keeps the same logging and sampled steps in every repetition.
        subject.run(WARM_STEPS, mon)
    try:
        cpu = time.process_time()
        times = subject.run(steps, mon)
        return times, (time.process_time() - cpu) / steps
    finally:
        if mon is not None:
            mon.close()


def measure(factory, batch_size: int, reps: int, steps: int, logdir: Path) -> dict[str, dict]:
    subject = Subject(factory, batch_size)
    names = list(VARIANTS)
    for name in names:  # warm-up: allocator, kernels, lazy imports of the Monitor's modules
        segment(subject, VARIANTS[name], 50, logdir, f"warmup-{name.replace(' ', '-')}")
    means: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    steps_all: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times, cpu = segment(subject, VARIANTS[name], steps, logdir, f"{name.replace(' ', '-')}-{rep}")
            means[name].append(sum(times) / len(times))
            cpus[name].append(cpu)
            steps_all[name] += times
    base = names[0]

    def paired(series: dict[str, list[float]], name: str) -> float:
        """Overhead vs bare within each repetition (one rotation), median over repetitions: a slow
        spell of the machine inflates both sides of a pair instead of one variant's median."""
        return statistics.median(v / b - 1 for v, b in zip(series[name], series[base]))

    return {n: {"mean": statistics.median(means[n]), "mean_over": paired(means, n),
                "median": statistics.median(steps_all[n]),
                "median_over": statistics.median(steps_all[n]) / statistics.median(steps_all[base]) - 1,
                "cpu": statistics.median(cpus[n]), "cpu_over": paired(cpus, n)} for n in names}


def print_table(results: dict[str, dict[str, dict]]) -> None:
    cols = (("mean", "ms/step"), ("median", "median step"), ("cpu", "CPU ms/step"))
    header = f"{'model':40} {'variant':11}" + "".join(f" {title:>12} {'overhead':>9}" for _, title in cols)
    print(header)
    print("-" * len(header))
    for model, rows in results.items():
        for name, r in rows.items():
            line = f"{model:40} {name:11}"
            for key, _ in cols:
                over = "" if name == "bare" else f"{r[key + '_over'] * 100:+.1f}%"
                line += f" {r[key] * 1e3:12.3f} {over:>9}"
            print(line)


def profile(steps: int, logdir: Path) -> None:
    """Where ``Monitor.step`` spends its time at defaults, on the MLP: time inside ``step()`` by kind
    of step (no profiler attached), then cProfile's view of the same calls."""
    subject = Subject(mlp, 64)
    segment(subject, {}, 50, logdir, "profile-warmup")
    kinds: dict[str, list[float]] = {"plain": [], "logging": [], "sampled": []}
    prof = cProfile.Profile()
    for profiled in (False, True):
        mon = subject.monitor({}, logdir, f"profile-{profiled}")
        mon.start()
        mon.start_epoch(1, steps)
        real_step = mon.step

        def step(*args, _real=real_step, _mon=mon, _profiled=profiled, **kwargs):
            logs = (_mon.global_step + 1) % _mon.log_every == 0
            kind = "sampled" if _mon.health.armed else "logging" if logs else "plain"
            t0 = time.perf_counter()
            if _profiled:
                prof.enable()
            _real(*args, **kwargs)
            if _profiled:
                prof.disable()
            else:
                kinds[kind].append(time.perf_counter() - t0)

        mon.step = step
        try:
            subject.run(steps, mon)
        finally:
            mon.close()
    total = sum(sum(v) for v in kinds.values())
    print(f"Time inside Monitor.step() at defaults, MLP, {steps} steps (medians; share of the total):")
    for kind, v in kinds.items():
        if v:  # with log_every == health.every_steps, every logging step is a sampled one
            print(f"  {kind:8} {len(v):5} steps  {statistics.median(v) * 1e6:8.1f} us  {sum(v) / total * 100:5.1f} %")
    print(f"  mean per step: {total / steps * 1e6:.1f} us\n")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(f"cProfile of the same calls (its own overhead inflates small Python functions):\n{out.getvalue()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions, fewer steps")
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 21, quick 3)")
    parser.add_argument("--steps", type=int, help="timed steps per repetition (default: MLP 400, CNN 100)")
    parser.add_argument("--profile", action="store_true", help="profile Monitor.step instead of timing")
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 21)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            profile(args.steps or 2000, Path(tmp))
            return
        results = {}
        for model, (factory, batch_size, full, short) in MODELS.items():
            n = args.steps or (short if args.quick else full)
            results[model] = measure(factory, batch_size, reps, n, Path(tmp) / model.split()[0])
    print(f"python {platform.python_version()}, torch {torch.__version__} (1 thread), "
          f"{platform.processor() or platform.machine()}")
    steps = ", ".join(f"{m.split(',')[0]} {args.steps or (v[3] if args.quick else v[2])}" for m, v in MODELS.items())
    print(f"{reps} interleaved repetitions per variant, steps each: {steps}. ms/step: mean step time of a "
          "repetition, median over repetitions; median step: median single step; CPU ms/step: process CPU "
          "time (all threads) per step, median over repetitions\n")
    print_table(results)


if __name__ == "__main__":
    main()

"""What watching costs: ``tbhealth train`` and a Monitor-instrumented loop against a plain PyTorch loop.

Every run is a fresh process (one torch thread, ``OMP_NUM_THREADS=1``), and the variants of one
model run interleaved, in a rotating order, round after round. Three measures:

* **per-epoch ratio**, two estimates: *wall*, the mean epoch period of the variant ÷ that of
  the plain loop *of the same round*, median over rounds (what a user sees, noise included), and
  *quiet*, the same ratio of each epoch's fastest round (:func:`quiet_mean`: contention from
  other jobs only ever adds time), and, for the plain loop and the Monitor custom loop, *CPU*:
  process CPU time per epoch, all threads, read by ``plain_loop.py`` at each epoch end. CPU
  time moves much less with other jobs' load, but misses waits (a checkpoint's ``fsync``) and
  counts the background threads' work even where a spare core would hide it. An epoch's period is the wall time between two consecutive moments
  at which an epoch's validation figures are on the host (epoch 1 and start-up excluded), read the
  same way on both sides: for ``tbhealth train`` from the ``train/loss`` event that
  ``Monitor.end_epoch`` writes (its wall time), for ``plain_loop.py`` from its own timing hook,
  taken at the same point of its loop. The period includes everything a user waits for between
  epochs: training, validation, and for ``tbhealth train`` its checkpoints.
* **between epochs**: the part of the period outside the Monitor's epoch (``start_epoch`` to
  ``end_epoch``, read from the run's ``epoch_durations`` in ``last.pt``): the trainer's
  checkpoints (last, best, every N), the scheduler and the epoch-end log. Shown separately
  because it is the checkpoints' cost.
* **start-up**: process launch → first step done (its loss on the host), ``tbhealth train …
  --set logging.every_steps=1`` (the step/loss event of step 1) against ``plain_loop.py``, which
  reads the digits file the way tbhealth does; for reference also ``plain_loop.py --data
  sklearn`` (``sklearn.datasets.load_digits``, which imports scikit-learn: ~2 s more). Also the
  process's CPU time at that moment (``startup_probe.py`` around ``tbhealth train``), which other
  jobs' load moves much less than wall time. Children run from bytecode (``PYTHONDONTWRITEBYTECODE``
  is dropped) and each start-up variant runs once untimed first.

Parts are switched off through public knobs only: ``health.enabled: false``,
``logging.every_steps`` = 10⁹, ``checkpoint.every_epochs: 0`` (``last.pt`` and ``best.pt`` are
still written each epoch: there is no key that turns them off), and for the custom loop
``Monitor(health=False)``, ``log_every=10**9``, ``system_metrics=False``. ``tbhealth train``
has no switch for system metrics, and nothing has one for the heartbeat: both are measured
only as part of the whole.

    python benchmarks/bench_overhead.py                 # 5 rounds, mlp and cnn, ~25 min on 2 cores
    python benchmarks/bench_overhead.py --quick         # 1 round, mlp, 3 epochs: a smoke test
    python benchmarks/bench_overhead.py --only startup  # start-up alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ROOT / "benchmarks" / "plain_loop.py"
PROBE = ROOT / "benchmarks" / "startup_probe.py"
EXAMPLES = {"mlp": ROOT / "examples" / "digits.yaml", "cnn": ROOT / "examples" / "digits_cnn.yaml"}
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
#: Children run from bytecode, as an installed package does: with ``PYTHONDONTWRITEBYTECODE`` set
#: (some sandboxes and CI images set it) every run of ``tbhealth train`` would compile tbhealth's ~70
#: modules from source (~0.2 s CPU) while the plain script's torch comes compiled from site-packages.
UNSET = ("PYTHONDONTWRITEBYTECODE",)


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in UNSET} | ENV

#: variant -> ("train", --set overrides) for ``tbhealth train``, ("loop", Monitor variant) for the
#: custom loop, ("plain", None) for the reference.
VARIANTS: dict[str, tuple[str, object]] = {
    "plain loop": ("plain", None),
    "train: defaults": ("train", []),
    "train: health off": ("train", ["health.enabled=false"]),
    "train: logging off": ("train", ["logging.every_steps=1000000000"]),
    "train: periodic ckpt off": ("train", ["checkpoint.every_epochs=0"]),
    "train: all three off": ("train", ["health.enabled=false", "logging.every_steps=1000000000",
                                       "checkpoint.every_epochs=0"]),
    "loop+Monitor: defaults": ("loop", "default"),
    "loop+Monitor: health off": ("loop", "no-health"),
    "loop+Monitor: logging off": ("loop", "no-logging"),
    "loop+Monitor: system off": ("loop", "no-system"),
}
QUICK_VARIANTS = ("plain loop", "train: defaults", "loop+Monitor: defaults")


@dataclass
class Run:
    """One process's timings (wall-clock seconds since the epoch)."""

    launched: float
    first_step: float | None = None
    epoch_ends: list[float] = field(default_factory=list)
    epoch_active: list[float] = field(default_factory=list)  # start to end of each epoch's own work
    cpu_total: float = 0.0  # CPU seconds of the whole process (all threads), from getrusage
    epoch_cpu: list[float] = field(default_factory=list)  # process CPU at each epoch end (plain_loop.py only)
    first_step_cpu: float | None = None  # process CPU seconds when step 1 was done (start-up runs)

    def cpu_per_epoch(self) -> float | None:
        """Process CPU seconds per epoch (epochs 2..N), where the run reads its own CPU clock
        (``plain_loop.py``); None for ``tbhealth train``, whose whole-run CPU minus a one-epoch
        run's proved too noisy here (start-up CPU varies by more than 15 epochs of the MLP)."""
        if not self.epoch_cpu:
            return None
        return (self.epoch_cpu[-1] - self.epoch_cpu[0]) / (len(self.epoch_cpu) - 1)

    def periods(self) -> list[float]:
        """Epoch periods from epoch 2 on (epoch 1 carries start-up and first-call costs)."""
        return [b - a for a, b in zip(self.epoch_ends, self.epoch_ends[1:])]

    def mean_period(self) -> float:
        return statistics.fmean(self.periods())

    def gaps(self) -> list[float]:
        """Per epoch from epoch 2 on: time spent outside the epoch's own work (checkpoints and the like)."""
        return [p - a for p, a in zip(self.periods(), self.epoch_active[1:])]


def quiet_mean(lists: list[list[float]]) -> float:
    """Mean over epochs of each epoch's fastest round: contention from other jobs only ever adds
    time, so the per-epoch minimum over rounds estimates the cost on a quiet machine, and keeping
    every epoch index keeps the periodic work (a checkpoint every 5 epochs) at its true rate."""
    return statistics.fmean(min(column) for column in zip(*lists))


def run_plain(model: str, epochs: int, tmp: Path, monitor: str | None = None, data: str = "file",
              device: str = "cpu") -> Run:
    out = tmp / f"plain-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(PLAIN), "--model", model, "--epochs", str(epochs), "--out", str(out), "--device",
           device, "--logdir", str(tmp / "runs"), "--data", data] + (["--monitor", monitor] if monitor else [])
    launched = time.time()
    cpu = _run(cmd)
    data = json.loads(out.read_text())
    active = [e - s for s, e in zip(data["epoch_starts"], data["epoch_ends"])]
    return Run(launched, data["first_step"], data["epoch_ends"], active, cpu, data["epoch_cpu"], data.get("first_step_cpu"))


def run_train(model: str, epochs: int, tmp: Path, overrides: list[str], device: str = "cpu",
              python: str = sys.executable, probe: bool = False) -> Run:
    """``tbhealth train`` on the example (``python``: another environment's, e.g. an older tbhealth);
    ``probe``: through ``startup_probe.py``, which also records the CPU time at step 1."""
    name = f"{model}-{time.monotonic_ns()}"
    sets = [a for o in [f"epochs={epochs}", f"device={device}", *overrides] for a in ("--set", o)]
    probe_out = tmp / f"{name}.probe.json"
    launcher = [str(PROBE), str(probe_out)] if probe else ["-m", "tbhealth_cli.app"]
    cmd = [python, *launcher, "train", str(EXAMPLES[model]), "--logdir", str(tmp / "runs"),
           "--name", name, "--quiet", *sets]
    launched = time.time()
    cpu = _run(cmd, cwd=tmp)
    run = read_run(tmp / "runs" / name, launched)
    run.cpu_total = cpu
    if probe:
        run.first_step_cpu = json.loads(probe_out.read_text()).get("first_step_cpu")
    return run


def read_run(run_dir: Path, launched: float) -> Run:
    """Epoch ends (the ``train/loss`` events), the first logged step, and epoch durations from last.pt."""
    import torch
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    run = Run(launched)
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            tags = {v.tag for v in event.summary.value}
            if "train/loss" in tags:
                run.epoch_ends.append(event.wall_time)
            if "step/loss" in tags and run.first_step is None and event.step == 1:
                run.first_step = event.wall_time
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    run.epoch_active = list(state["monitor"]["epoch_durations"])
    return run


def _run(cmd: list[str], cwd: Path | None = None) -> float:
    """Run ``cmd`` to the end; returns its CPU seconds (user + system, all threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def measure(name: str, model: str, epochs: int, tmp: Path, device: str = "cpu") -> Run:
    kind, arg = VARIANTS[name]
    if kind == "train":
        return run_train(model, epochs, tmp, list(arg), device=device)
    if kind == "baseline":
        return run_train(model, epochs, tmp, [], device=device, python=str(arg))
    return run_plain(model, epochs, tmp, monitor=arg if kind == "loop" else None, device=device)


def rotated(names: list[str], i: int) -> list[str]:
    k = i % len(names)
    return names[k:] + names[:k]


def overhead(model: str, names: list[str], rounds: int, epochs: int, tmp: Path,
             device: str = "cpu") -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for r in range(rounds):
        for name in rotated(names, r):
            runs[name].append(measure(name, model, epochs, tmp, device))
        print(f"  {model} round {r + 1}/{rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return runs


def startup(model: str, rounds: int, tmp: Path, baseline: str | None = None) -> dict[str, list[Run]]:
    """One-epoch runs of ``tbhealth train`` and of the plain script, interleaved: their start-up
    (launch to the first step done) and their CPU time (what a longer run spends before epoch 2)."""
    out: dict[str, list[Run]] = {"plain script": [], "tbhealth train": [], "plain, load_digits": []}
    if baseline:
        out["tbhealth train, before"] = []

    def once(name: str) -> Run:
        if name.startswith("tbhealth train"):
            return run_train(model, 1, tmp, ["logging.every_steps=1"], probe=True,
                             python=baseline if "before" in name else sys.executable)
        return run_plain(model, 1, tmp, data="sklearn" if "load_digits" in name else "file")

    for name in out:  # untimed: writes the bytecode and warms the page cache, as any earlier run would
        once(name)
    for r in range(rounds):
        for name in rotated(list(out), r):
            out[name].append(once(name))
    return out


def summarize(runs: dict[str, list[Run]]) -> dict[str, dict[str, float | None]]:
    """Per variant: ``ratio`` (wall clock: median over rounds of the paired ratio to the plain loop
    of the same round, with its min and max), ``quiet_ratio`` (:func:`quiet_mean` of both), ms per
    epoch (median over rounds, and quiet), ms between epochs (quiet), and ``cpu_ratio``: process
    CPU per epoch (median over rounds) ÷ the plain loop's, where the run measures it."""
    plain = runs["plain loop"]
    plain_quiet = quiet_mean([p.periods() for p in plain])
    plain_cpu = statistics.median(p.cpu_per_epoch() for p in plain)
    out = {}
    for name, rs in runs.items():
        ratios = sorted(r.mean_period() / p.mean_period() for r, p in zip(rs, plain))
        quiet = quiet_mean([r.periods() for r in rs])
        cpus = [r.cpu_per_epoch() for r in rs]
        cpu = statistics.median(cpus) if None not in cpus else None
        out[name] = {"ms_per_epoch": statistics.median(r.mean_period() for r in rs) * 1e3,
                     "ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
                     "quiet_ms_per_epoch": quiet * 1e3, "quiet_ratio": quiet / plain_quiet,
                     "quiet_between_epochs_ms": quiet_mean([r.gaps() for r in rs]) * 1e3,
                     "cpu_ms_per_epoch": None if cpu is None else cpu * 1e3,
                     "cpu_ratio": None if cpu is None else cpu / plain_cpu}
    return out


def ratio_table(model: str, runs: dict[str, list[Run]]) -> list[str]:
    lines = [f"\n{model}: per epoch (epochs 2..N) vs the plain loop. wall: median over rounds of the paired "
             "ratio; quiet: each epoch's fastest round; CPU: process CPU time, all threads",
             f"{'variant':28} {'wall ms':>8} {'ratio':>6} {'min-max':>12} | {'quiet ms':>8} {'ratio':>6} "
             f"{'between':>9} | {'CPU ms':>7} {'ratio':>6}", "-" * 106]
    for name, v in summarize(runs).items():
        cpu = (f"{v['cpu_ms_per_epoch']:7.1f} {v['cpu_ratio']:6.3f}" if v["cpu_ratio"] is not None
               else f"{'-':>7} {'-':>6}")
        lines.append(f"{name:28} {v['ms_per_epoch']:8.1f} {v['ratio']:6.3f} {v['ratio_min']:5.2f}-{v['ratio_max']:<6.2f} | "
                     f"{v['quiet_ms_per_epoch']:8.1f} {v['quiet_ratio']:6.3f} {v['quiet_between_epochs_ms']:6.1f} ms | {cpu}")
    return lines


def startup_table(model: str, runs: dict[str, list[Run]]) -> list[str]:
    times = {name: [r.first_step - r.launched for r in rs] for name, rs in runs.items()}
    plain, plain_min = statistics.median(times["plain script"]), min(times["plain script"])
    plain_cpu = statistics.median(r.first_step_cpu for r in runs["plain script"])
    lines = [f"\n{model}: start-up, launch -> first step done (s), {len(times['plain script'])} runs each; "
             "CPU to step 1: the process's CPU time when step 1 was done (median); CPU s: a whole one-epoch run",
             f"{'':22} {'median':>7} {'vs plain':>9} {'min':>6} {'vs plain':>9} {'max':>6} "
             f"{'CPU to step 1':>13} {'vs plain':>9} {'CPU s':>6}"]
    for name, ts in times.items():
        med, cpu = statistics.median(ts), statistics.median(r.cpu_total for r in runs[name])
        first = statistics.median(r.first_step_cpu for r in runs[name])
        lines.append(f"{name:22} {med:7.2f} {med - plain:+9.2f} {min(ts):6.2f} {min(ts) - plain_min:+9.2f} "
                     f"{max(ts):6.2f} {first:13.2f} {first - plain_cpu:+9.2f} {cpu:6.2f}")
    return lines


def machine() -> str:
    import torch

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} CPUs ({cpu}), python {platform.python_version()}, torch {torch.__version__}, "
            f"1 torch thread; load average {load}")


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, mlp, 3 epochs, three variants")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved runs (default 5; quick 1)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 16; quick 3)")
    parser.add_argument("--models", default=None, help="comma-separated: mlp,cnn (quick: mlp)")
    parser.add_argument("--only", choices=("overhead", "startup"), help="one measure only")
    parser.add_argument("--baseline-python", help="also time `tbhealth train` from this Python (an environment "
                                                  "with an older tbhealth): rows marked 'before'")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    epochs = args.epochs or (3 if args.quick else 21)
    models = (args.models or ("mlp" if args.quick else "mlp,cnn")).split(",")
    names = list(QUICK_VARIANTS if args.quick else VARIANTS)
    if args.baseline_python:
        VARIANTS["train: defaults, before"] = ("baseline", args.baseline_python)
        names.insert(2, "train: defaults, before")
    lines = [f"machine: {machine()}", f"{rounds} round(s), {epochs} epochs per run"]
    show(lines)
    with tempfile.TemporaryDirectory(prefix="tbhealth-bench-") as tmp:
        for model in models:
            if args.only != "overhead":
                lines += show(startup_table(model, startup(model, rounds, Path(tmp), args.baseline_python)))
            if args.only != "startup":
                lines += show(ratio_table(model, overhead(model, names, rounds, epochs, Path(tmp))))
    lines += show([f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}"])
    return lines


def show(lines: list[str]) -> list[str]:
    """Print a table as soon as it is measured (a long run interrupted keeps what it has)."""
    print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()

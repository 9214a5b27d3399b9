"""Control latency against a real ``tbhealth train`` process: request written -> trainer acts.

For each workload a real training (``epochs=100000``) runs in a subprocess; this script sends it
pause/resume pairs and checkpoint requests through ``RunDir.request_control``, exactly as the
CLI does, with random gaps so requests land at every phase of a step. Per request:

* **acted**: the acknowledgement's ``time`` (stamped by the trainer right after it applied the
  request) minus the request's ``time`` (stamped when it was appended) — the trainer's latency;
* **CLI wait**: wall time from before ``request_control`` until ``wait_for_ack`` (50 ms polling,
  as ``tbhealth pause`` uses) returns — what a user waits for, less the CLI's start-up.

The training step time comes from the same run: it logs every step (``logging.every_steps=1``),
and the wall times of consecutive ``step/loss`` events in its TensorBoard file give each
step's duration. Steps that cross an epoch boundary also hold the epoch's validation and
checkpoints, a stretch in which no step ends and so no request can be picked up; they are
reported apart ("epoch-end gap"), and each request is classed by whether it arrived during one.
Target: latency <= the step in flight when the request arrived + 0.25 s.

    python benchmarks/bench_control.py                # 40 pairs + 10 checkpoints per workload
    python benchmarks/bench_control.py --quick        # 10 pairs + 3 checkpoints, MLP only
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tbhealth.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
TARGET_SLACK_S = 0.25

WORKLOADS = {
    "mlp": ("examples/digits.yaml", []),
    "cnn": ("examples/digits_cnn.yaml", ["model.kwargs.channels=[64,128]"]),
}


@dataclass
class Sample:
    command: str
    request_time: float
    cli_wait: float
    ack: dict = field(default_factory=dict)

    @property
    def acted(self) -> float:
        return self.ack["time"] - self.request_time


def tbhealth_exe() -> str:
    exe = Path(sys.executable).with_name("tbhealth")
    return str(exe) if exe.exists() else "tbhealth"


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def send(rd: RunDir, command: str) -> Sample:
    t0 = time.perf_counter()
    rid = rd.request_control(command, source="bench")
    ack = rd.wait_for_ack(rid, timeout=60)  # default 50 ms polling, like the CLI
    wait = time.perf_counter() - t0
    if ack is None:
        raise SystemExit(f"no acknowledgement of {command} within 60 s")
    if ack["status"] != "done":
        raise SystemExit(f"{command} rejected: {ack.get('detail')}")
    (req,) = [r for r in rd.read_control(0)[0] if r.id == rid]
    return Sample(command, req.time, wait, ack)


def step_times(run_dir: Path, batches_per_epoch: int, busy: list[tuple[float, float]]):
    """(durations of steps inside an epoch, of steps spanning an epoch end, those spans, all step times).

    Steps overlapping a ``busy`` window (paused, or writing a requested checkpoint) are left out.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == "step/loss" for v in event.summary.value):
                points.append((event.step, event.wall_time))
    points.sort()
    inside, across, spans = [], [], []
    walls = [w for _, w in points]
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s1 != s0 + 1 or any(a < t1 and t0 < b for a, b in busy):
            continue
        if (s0 - 1) // batches_per_epoch != (s1 - 1) // batches_per_epoch:
            across.append(t1 - t0)
            spans.append((t0, t1))
        else:
            inside.append(t1 - t0)
    return inside, across, spans, walls


def busy_windows(samples: list[Sample]) -> list[tuple[float, float]]:
    windows, paused_at = [], None
    for s in samples:
        if s.command == "pause":
            paused_at = s.ack["time"]
        elif s.command == "resume" and paused_at is not None:
            windows.append((paused_at, s.ack["time"]))
        elif s.command == "checkpoint":
            windows.append((s.request_time, s.ack["time"]))
    return windows


def in_flight(t: float, walls: list[float]) -> float | None:
    """Duration of the step (or epoch-end stretch) that was running at time ``t``."""
    i = bisect.bisect_right(walls, t)
    return walls[i] - walls[i - 1] if 0 < i < len(walls) else None


def in_spans(t: float, spans: list[tuple[float, float]]) -> bool:
    i = bisect.bisect_right([a for a, _ in spans], t) - 1
    return i >= 0 and spans[i][0] <= t <= spans[i][1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def run_workload(name: str, pairs: int, checkpoints: int, logdir: Path, seed: int) -> dict:
    config, overrides = WORKLOADS[name]
    cmd = [tbhealth_exe(), "train", str(REPO / config), "--logdir", str(logdir), "--name", name, "--quiet",
           "--set", "epochs=100000", "--set", "logging.every_steps=1"]
    for o in overrides:
        cmd += ["--set", o]
    out = open(logdir / f"{name}.out", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    rd = RunDir(logdir / name)
    rng = random.Random(seed)
    samples: list[Sample] = []
    try:
        wait_until(lambda: (s := rd.read_status()) and s["epochs_done"] >= 1 and s, 300, f"{name}: first epoch")
        ck_every = max(1, pairs // max(checkpoints, 1))
        for i in range(pairs):
            time.sleep(rng.uniform(0.05, 0.5))
            samples.append(send(rd, "pause"))
            time.sleep(rng.uniform(0.05, 0.3))
            samples.append(send(rd, "resume"))
            if checkpoints and i % ck_every == ck_every - 1 and sum(s.command == "checkpoint" for s in samples) < checkpoints:
                time.sleep(rng.uniform(0.05, 0.5))
                samples.append(send(rd, "checkpoint"))
        status = rd.read_status()
        stop = rd.request_control("stop", source="bench")
        rd.wait_for_ack(stop, 60)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out.close()
    inside, across, spans, walls = step_times(rd.path, status["batches_per_epoch"], busy_windows(samples))
    return {"name": name, "samples": samples, "inside": inside, "across": across, "spans": spans, "walls": walls,
            "batches_per_epoch": status["batches_per_epoch"], "steps": status["global_step"]}


def report(results: list[dict]) -> None:
    print("\nTraining step of the same run (from per-step event wall times), seconds:")
    print("| workload | steps/epoch | steps timed | step median | step p95 | epoch-end gap median | epoch-end gap p95 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['batches_per_epoch']} | {len(r['inside'])} | {statistics.median(r['inside']):.4f} | "
              f"{pct(r['inside'], 95):.4f} | {statistics.median(r['across']):.3f} | {pct(r['across'], 95):.3f} |")
    print("\nControl latency, seconds. acted = ack time - request time; over = acted - the duration of the step")
    print("in flight when the request arrived (target: over <= 0.25; while paused no step runs, so over = acted).")
    print("Checkpoint latency includes writing the file, so it has no target here. CLI wait = request -> wait_for_ack returns.")
    print("| workload | command | n | acted median | acted p95 | acted max | over p95 | over max | within target | CLI wait median | CLI wait p95 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for command in ("pause", "resume", "checkpoint"):
            group = [s for s in r["samples"] if s.command == command]
            if not group:
                continue
            acted = [s.acted for s in group]
            wait = [s.cli_wait for s in group]
            over_cols = "— | — | —"
            if command != "checkpoint":
                over = [s.acted - ((in_flight(s.request_time, r["walls"]) or 0.0) if command == "pause" else 0.0)
                        for s in group]
                within = sum(o <= TARGET_SLACK_S for o in over)
                over_cols = f"{pct(over, 95):.3f} | {max(over):.3f} | {within}/{len(over)}"
            print(f"| {r['name']} | {command} | {len(group)} | {statistics.median(acted):.3f} | {pct(acted, 95):.3f} | "
                  f"{max(acted):.3f} | {over_cols} | {statistics.median(wait):.3f} | {pct(wait, 95):.3f} |")
    print("\nPause requests by where they arrived (a request sent while the epoch's validation and")
    print("checkpoints run waits for them: no step ends there):")
    print("| workload | arrived | n | acted median | acted max |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        pauses = [s for s in r["samples"] if s.command == "pause"]
        for label, group in (("during a step", [s for s in pauses if not in_spans(s.request_time, r["spans"])]),
                             ("during an epoch end", [s for s in pauses if in_spans(s.request_time, r["spans"])])):
            if group:
                acted = [s.acted for s in group]
                print(f"| {r['name']} | {label} | {len(group)} | {statistics.median(acted):.3f} | {max(acted):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40, help="pause/resume pairs per workload")
    ap.add_argument("--checkpoints", type=int, default=10, help="checkpoint requests per workload")
    ap.add_argument("--workloads", default="mlp,cnn", help=f"comma-separated: {', '.join(WORKLOADS)}")
    ap.add_argument("--quick", action="store_true", help="10 pairs, 3 checkpoints, mlp only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", type=Path, help="also write every request's timings to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.checkpoints, args.workloads = 10, 3, "mlp"
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        results = []
        for i, name in enumerate(names):
            print(f"{name}: training and sending {args.pairs} pause/resume pairs + {args.checkpoints} checkpoints ...",
                  flush=True)
            results.append(run_workload(name, args.pairs, args.checkpoints, Path(tmp), args.seed + i))
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    report(results)
    if args.dump:
        args.dump.write_text(json.dumps([
            {"workload": r["name"], "walls": r["walls"], "spans": r["spans"],
             "requests": [{"command": s.command, "request_time": s.request_time, "cli_wait": s.cli_wait, "ack": s.ack}
                          for s in r["samples"]]} for r in results]))


if __name__ == "__main__":
    main()

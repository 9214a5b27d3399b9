"""How long the Health tab's run page takes to update for a 100k-step run, in real Chromium.

    python benchmarks/bench_tab.py [--steps 100000] [--layers 20] [--polls 20]

1. Writes one run the size of a long training through tbhealth's own writers (the real format):
   ``EventWriter`` for the scalars (``step/loss`` and ``step/grad_norm`` every step, per-epoch
   ``train/*``, ``val/*`` and ``lr`` over 100 epochs with a StepLR-like schedule, per-layer
   ``health/*/<layer>`` every 50 steps) and ``RunDir`` for the run state (status, hundreds of
   alerts fired and resolved, pause/resume/checkpoint requests with their acknowledgements).
2. Keeps it live: a thread appends a step every 0.1 s and rewrites the heartbeat, so every poll
   of the page brings new points and every chart is redrawn (the expensive case).
3. Starts a real TensorBoard (``--reload_interval 1``), times each route of the page once
   TensorBoard has loaded the run, then opens the run page in headless Chromium and reads the
   page's own User Timing measures over ``--polls`` polls: ``tbhealth-fetch`` (all routes, in
   parallel) and ``tbhealth-render`` (DOM updates, Plotly redraws of 4 charts, timeline and
   heatmap: main-thread work while the page cannot react).

Figures depend on the machine: compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tbhealth.monitor.events import EventWriter
from tbhealth.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.plugin_helpers import (  # noqa: E402
    CHROMIUM, CHROMIUM_ARGS, free_port, start_tensorboard, stop_process, wait_for, wait_for_listing,
)

EPOCHS = 100
HEALTH_EVERY = 50
STEP_S = 0.36  # a 100k-step run of 10 hours


def write_run(run: Path, steps: int, n_layers: int, t0: float) -> dict:
    """The run's event file and state files; returns what was written (for the report)."""
    rd = RunDir(run)
    per_epoch = steps // EPOCHS
    layers = [f"blocks.{i}.linear" for i in range(n_layers)]
    acts = [f"blocks.{i}.act" for i in range(n_layers)]
    rd.write_layers([name for pair in zip(layers, acts) for name in pair])
    writer = EventWriter(run, flush_secs=1.0, max_queue=1_000_000)
    lr = 0.1
    for step in range(1, steps + 1):
        wall = t0 + step * STEP_S
        writer.scalars(step, {"step/loss": 2.3 / (1 + step / 5000), "step/grad_norm": 1.0 + (step % 97) / 97}, wall)
        if step % HEALTH_EVERY == 0:
            health = {f"health/grad_norm/{name}": 10.0 ** (-12 + 12 * (i + 1) / n_layers) for i, name in enumerate(layers)}
            health.update({f"health/dead_units/{name}": (i % 5) / 10 for i, name in enumerate(acts)})
            health.update({f"health/zero_activations/{name}": 0.5 for name in acts})
            writer.scalars(step, health, wall)
        if step % per_epoch == 0:
            epoch = step // per_epoch
            writer.scalars(epoch, {"train/loss": 1 / epoch, "val/loss": 1.1 / epoch, "train/acc": 0.9, "val/acc": 0.85,
                                   "lr": lr}, wall)
            if epoch % 3 == 0:
                lr *= 0.5
    writer.close()
    n_alerts = 0
    for i in range(0, steps, steps // 300):  # 300 episodes, each fired then resolved 2000 steps later
        alert = {"id": f"a{i}", "rule": ["loss_spike", "exploding_gradients", "vanishing_gradients"][i % 3],
                 "severity": "warning", "message": f"episode at step {i}", "epoch": i // per_epoch + 1, "step": i,
                 "time": t0 + i * STEP_S, "layer": layers[0] if i % 3 == 2 else None, "value": 1.0, "threshold": 0.5,
                 "resolved": False}
        rd.append_alert(alert)
        if i + 2000 < steps:
            rd.append_alert({**alert, "resolved": True})
            rd.append_log("INFO", f"resolved: {alert['message']}", t=t0 + (i + 2000) * STEP_S)
        n_alerts += 1
    n_controls = 0
    for i in range(1, 51):  # 50 pause/resume pairs and 25 checkpoints
        step = i * steps // 51
        for command in ("pause", "resume") + (("checkpoint",) if i % 2 else ()):
            rid = rd.request_control(command, source="bench")
            rd.acknowledge(rid, "done", f"{command} at step {step}", command=command, step=step, time=t0 + step * STEP_S)
            n_controls += 1
    return {"per_epoch": per_epoch, "alerts": n_alerts, "controls": n_controls, "layers": n_layers}


def status(step: int, steps: int, per_epoch: int, t0: float) -> dict:
    return {"run": "big", "state": "training", "epoch": min(EPOCHS, step // per_epoch + 1), "total_epochs": EPOCHS + 1,
            "batch": step % per_epoch, "batches_per_epoch": per_epoch, "global_step": step, "started_at": t0,
            "elapsed_s": step * STEP_S, "eta_s": 3600.0, "metrics": {}, "system": {"cpu_percent": 50.0, "gpu": None},
            "alerts_active": 0, "health_score": 90, "interventions": {}}


def keep_live(run: Path, steps: int, per_epoch: int, t0: float, stop: threading.Event) -> None:
    """A step every 0.1 s and a heartbeat: each poll of the page has something new to draw."""
    rd = RunDir(run)
    with EventWriter(run, flush_secs=0.5, filename_suffix=".live") as writer:
        step = steps
        while not stop.wait(0.1):
            step += 1
            writer.scalars(step, {"step/loss": 0.3, "step/grad_norm": 1.0}, t0 + step * STEP_S)
            rd.write_status(status(step, steps, per_epoch, t0))


def get(port: int, route: str) -> tuple[float, int, dict]:
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://localhost:{port}/data/plugin/tbhealth/{route}", timeout=60) as r:
        body = r.read()
    return (time.perf_counter() - t) * 1000, len(body), json.loads(body)


def last_step(port: int) -> int:
    try:
        series = get(port, "scalars?run=big&tags=step/loss")[2]["series"]
    except OSError:  # the run is not listed yet
        return 0
    return series["step/loss"]["steps"][-1] if "step/loss" in series else 0


def summary(ms: list[float]) -> str:
    p95 = sorted(ms)[max(0, math.ceil(0.95 * len(ms)) - 1)]
    return f"median {statistics.median(ms):7.1f} ms   p95 {p95:7.1f} ms   max {max(ms):7.1f} ms"


def measure_page(port: int, polls: int) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t = time.perf_counter()
        page.goto(f"http://localhost:{port}/#tbhealth")
        f = page.frame_locator("iframe")
        f.locator('[data-testid="overview"]').wait_for(timeout=60_000)
        f.locator("body").evaluate("b => { location.hash = 'run=big'; }")
        f.locator('[data-testid="chart-layers"] .main-svg').first.wait_for(timeout=120_000)
        first = time.perf_counter() - t
        entries = "n => performance.getEntriesByName(n).map(e => e.duration)"
        wait_for(lambda: len(f.locator("body").evaluate(f"(b) => ({entries})('tbhealth-render')")) >= polls + 1,
                 polls * 10 + 60, f"{polls} polls")
        fetch = f.locator("body").evaluate(f"(b) => ({entries})('tbhealth-fetch')")[1:]
        render = f.locator("body").evaluate(f"(b) => ({entries})('tbhealth-render')")[1:]
        points = f.locator('[data-testid="chart-steps"]').evaluate("el => el.data[0].x.length")
        events = f.locator('[data-testid="chart-timeline"]').evaluate("el => el.data.reduce((n, t) => n + t.x.length, 0)")
        browser.close()
    return {"first": first, "fetch": fetch, "render": render, "points": points, "timeline_points": events}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="global steps in the run")
    parser.add_argument("--layers", type=int, default=20, help="layers with per-layer health series")
    parser.add_argument("--polls", type=int, default=20, help="page updates to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tab-") as tmp:
        logdir = Path(tmp) / "runs"
        t0 = time.time() - args.steps * STEP_S
        t = time.perf_counter()
        info = write_run(logdir / "big", args.steps, args.layers, t0)
        print(f"wrote a {args.steps}-step run ({info['layers']} layers, {info['alerts']} alert episodes, "
              f"{info['controls']} control actions) in {time.perf_counter() - t:.1f} s")
        stop = threading.Event()
        live = threading.Thread(target=keep_live, args=(logdir / "big", args.steps, info["per_epoch"], t0, stop), daemon=True)
        RunDir(logdir / "big").write_status(status(args.steps, args.steps, info["per_epoch"], t0))
        live.start()
        port = free_port()
        tb = start_tensorboard(logdir, port)
        try:
            t = time.perf_counter()
            wait_for_listing(port)
            wait_for(lambda: last_step(port) >= args.steps, 300, "TensorBoard to load the run")
            print(f"TensorBoard loaded it in {time.perf_counter() - t:.1f} s")
            print("\nroutes (5 calls each, after loading):")
            for route in ("status?run=big", "scalars?run=big&tags=train/loss,val/loss,train/acc,val/acc,lr,step/loss,step/grad_norm",
                          "events?run=big", "layers?run=big", "alerts?run=big&after=0", "logs?run=big&offset=0"):
                calls = [get(port, route) for _ in range(5)]
                print(f"  GET {route.split('?')[0]:8s} {summary([c[0] for c in calls])}   {calls[-1][1] / 1024:7.1f} KiB")
            page = measure_page(port, args.polls)
        finally:
            stop.set()
            stop_process(tb)
    print(f"\nrun page in Chromium 1400x1000, {args.polls} polls while the run grows "
          f"(step chart {page['points']} points, timeline {page['timeline_points']} markers):")
    print(f"  first view until every chart is drawn   {page['first']:.1f} s (includes loading plotly.js)")
    print(f"  update: fetch (routes, parallel)       {summary(page['fetch'])}")
    print(f"  update: render (DOM + Plotly redraws)  {summary(page['render'])}")
    total = [a + b for a, b in zip(page["fetch"], page["render"])]
    print(f"  update: total                          {summary(total)}")
    print(f"\nmachine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{subprocess.run(['/usr/bin/chromium', '--version'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()

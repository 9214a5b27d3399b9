"""How fast the Health tab answers with many runs, and what it adds to TensorBoard's start-up.

    python benchmarks/bench_plugin.py [--runs 500] [--repeats 3]

1. Writes ``--runs`` run directories through ``tbhealth.run`` (status, 50 log records and
   2 alerts each, like a real run's state files; no event files: these routes never read them).
2. Times ``GET runs`` and ``GET status`` through TensorBoard's own WSGI application (the
   ``*_impl`` call plus werkzeug, JSON and gzip), targets 100 ms and 20 ms.
3. Times TensorBoard start-up until ``/data/plugins_listing`` answers, with and without the
   plugin, alternating. Both start the same way (TensorBoard's own ``main`` with the plugin list
   built from the ``tensorboard_plugins`` entry points); "without" leaves out the ``tbhealth``
   entry point, so the plugin module is never imported.

Figures depend on the machine: run it on the same machine before and after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tbhealth.run.rundir import RunDir

RUNS_TARGET_MS = 100.0
STATUS_TARGET_MS = 20.0

_TB_MAIN = """
import sys
from importlib.metadata import entry_points
from absl import app
from tensorboard import default, main_lib, program
main_lib.global_init()
skip = set(sys.argv[1].split(",")) - {""}
plugins = default.get_static_plugins() + [
    ep.load() for ep in entry_points(group="tensorboard_plugins") if ep.name not in skip]
tb = program.TensorBoard(plugins=plugins)
app.run(tb.main, flags_parser=tb.configure, argv=["tensorboard", *sys.argv[2:]])
"""


def make_runs(logdir: Path, n: int) -> None:
    """``n`` runs in a mix of states; the newest few are 'live' (fresh heartbeat)."""
    states = ["completed", "training", "paused", "failed", "stopped"]
    now = time.time()
    for i in range(n):
        rd = RunDir(logdir / f"exp{i // 100}" / f"run-{i:04d}")
        metric = lambda v, d: {"value": v, "delta": d}  # noqa: E731
        rd.write_status({
            "run": f"exp{i // 100}/run-{i:04d}", "state": states[i % len(states)], "epoch": 10 + i % 90,
            "total_epochs": 100, "batch": 12, "batches_per_epoch": 256, "global_step": 5000 + i,
            "started_at": now - 3600 + i, "elapsed_s": 3600.0 - i, "eta_s": 1200.0,
            "metrics": {"train_loss": metric(0.3, -0.01), "train_acc": metric(0.9, 0.01),
                        "val_loss": metric(0.35, 0.0), "val_acc": metric(0.88, 0.002), "lr": metric(1e-3, 0.0)},
            "system": {"cpu_percent": 50.0, "process_cpu_percent": 80.0, "ram_used_bytes": 8 << 30,
                       "ram_total_bytes": 32 << 30, "process_rss_bytes": 2 << 30, "disk_read_bps": 1e6,
                       "disk_write_bps": 1e5, "gpu": None},
            "alerts_active": i % 3, "health_score": 100 - i % 40,
            "interventions": {"pauses": 0, "stops": 0, "checkpoints": 0},
        })
        for j in range(50):
            rd.append_log("INFO", f"Epoch {j} done: train_loss=0.3 val_loss=0.35")
        for j in range(2):
            rd.append_alert({"id": f"a{j}", "rule": "overfitting", "severity": "warning", "message": "gap",
                             "epoch": j, "step": j, "time": now, "layer": None, "value": 1.0, "threshold": 0.5,
                             "resolved": bool(j)})


def make_client(logdir: Path):
    from tensorboard import program
    from tensorboard.backend import application
    from tensorboard.plugins.core import core_plugin
    from werkzeug.test import Client

    from tbhealth_plugin.plugin import HealthLoader

    tb = program.TensorBoard(plugins=[core_plugin.CorePluginLoader, HealthLoader], assets_zip_provider=lambda: None)
    tb.configure(argv=["", "--logdir", str(logdir), "--load_fast", "false", "--reload_interval", "0",
                       "--reload_task", "blocking"])
    provider, multiplexer = tb._make_data_provider()
    return Client(application.TensorBoardWSGIApp(tb.flags, tb.plugin_loaders, provider, None, multiplexer))


def time_requests(client, url: str, n: int) -> list[float]:
    """Milliseconds per request (gzip accepted, like a browser); the first call warms caches."""
    client.get(url, headers={"Accept-Encoding": "gzip"})
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(url, headers={"Accept-Encoding": "gzip"})
        out.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (url, r.status_code, r.get_data()[:200])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup_seconds(logdir: Path, with_plugin: bool) -> float:
    """Seconds from spawning TensorBoard until /data/plugins_listing answers."""
    port = free_port()
    skip = "" if with_plugin else "tbhealth"
    cmd = [sys.executable, "-c", _TB_MAIN, skip, "--logdir", str(logdir), "--port", str(port)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/data/plugins_listing", timeout=2) as r:
                    listing = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"TensorBoard exited with {proc.returncode}") from None
                if time.perf_counter() - t > 120:
                    raise RuntimeError("TensorBoard did not answer within 120 s") from None
                time.sleep(0.05)
        elapsed = time.perf_counter() - t
        assert ("tbhealth" in listing) is with_plugin, sorted(listing)
        return elapsed
    finally:
        proc.terminate()
        proc.wait(20)


def summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=20)
    return f"median {statistics.median(ms):7.2f} ms   p95 {q[18]:7.2f} ms   max {max(ms):7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500, help="run directories to create")
    parser.add_argument("--repeats", type=int, default=3, help="start-ups per configuration")
    parser.add_argument("--requests", type=int, default=30, help="timed GET runs requests")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-plugin-") as tmp:
        logdir = Path(tmp) / "runs"
        t = time.perf_counter()
        make_runs(logdir, args.runs)
        print(f"wrote {args.runs} runs in {time.perf_counter() - t:.1f} s under {logdir}")

        from tbhealth_plugin import api

        client = make_client(logdir)
        prefix = "/data/plugin/tbhealth"
        n_listed = len(client.get(prefix + "/runs").get_json()["runs"])
        assert n_listed == args.runs, n_listed
        impl = []
        for _ in range(args.requests):
            t = time.perf_counter()
            api.runs_impl(str(logdir))
            impl.append((time.perf_counter() - t) * 1000)
        runs_ms = time_requests(client, prefix + "/runs", args.requests)
        status_ms = time_requests(client, prefix + "/status?run=exp2/run-0250", 200)
        ok = lambda ms, target: "OK" if statistics.median(ms) <= target else "OVER TARGET"  # noqa: E731
        print(f"\nGET runs   ({args.runs} runs)  {summary(runs_ms)}   target {RUNS_TARGET_MS:.0f} ms: {ok(runs_ms, RUNS_TARGET_MS)}")
        print(f"  runs_impl alone         {summary(impl)}")
        print(f"GET status             {summary(status_ms)}   target {STATUS_TARGET_MS:.0f} ms: {ok(status_ms, STATUS_TARGET_MS)}")

        print(f"\nTensorBoard start-up until /data/plugins_listing answers ({args.repeats} each, alternating):")
        with_p, without_p = [], []
        for _ in range(args.repeats):
            without_p.append(startup_seconds(logdir, with_plugin=False))
            with_p.append(startup_seconds(logdir, with_plugin=True))
        med_with, med_without = statistics.median(with_p), statistics.median(without_p)
        print(f"  without the plugin   median {med_without:5.2f} s   ({', '.join(f'{x:.2f}' for x in without_p)})")
        print(f"  with the plugin      median {med_with:5.2f} s   ({', '.join(f'{x:.2f}' for x in with_p)})")
        print(f"  difference           {med_with - med_without:+5.2f} s")
        print(f"\nmachine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()

"""The GPU checks in one command: overhead ratio on CUDA, zero host syncs off logging steps, NVML, NCCL.

    python benchmarks/gpu_check.py            # on a CUDA machine: a few minutes
    python benchmarks/gpu_check.py --quick    # fewer rounds/epochs; on a CPU machine: seconds

Four parts, each recorded even when another fails:

1. **ratio**: ``benchmarks/bench_overhead.py``'s measure with ``device=cuda``: per-epoch period of
   ``tbhealth train`` (MLP ``examples/digits.yaml`` and CNN ``examples/digits_cnn.yaml`` at their
   defaults) ÷ ``benchmarks/plain_loop.py`` on the GPU, interleaved rounds.
2. **sync**: ``torch.cuda.set_sync_debug_mode("error")`` around every step that neither logs
   (``logging.every_steps``) nor samples health (``health.every_steps``): in a real
   ``tbhealth.Monitor`` custom loop (``plain_loop.py``: forward to ``zero_grad``, ``mon.step``
   included) and in a real ``Trainer`` (a subclass switching the mode in its public
   ``forward_backward`` and ``end_epoch``: from the batch's copy to the device to the next batch,
   the DataLoader's pinning included). Any host-device sync there raises; the report has the
   error and the traceback's tail.
3. **nvml**: the status document's ``system.gpu`` after the Trainer run, and one direct reading.
4. **ddp**: ``tbhealth train examples/digits.yaml --nproc-per-node 1 --set device=cuda`` (torchrun,
   NCCL) to completion.

Without CUDA, parts 1, 3 and 4 are skipped with a message, and part 2 runs the same loops on the
CPU with the guard counting the steps it would check (so the script itself is tested anywhere).
Results go to ``$OUT/gpu_check.json`` when ``$OUT`` is set (or ``--out``), and to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_overhead  # noqa: E402
import plain_loop  # noqa: E402

ROOT = HERE.parent
DIGITS = ROOT / "examples" / "digits.yaml"


class SyncGuard:
    """Turns on ``set_sync_debug_mode("error")`` for quiet steps (no logging, no health sample).

    On a machine without CUDA it only counts the steps it would guard.
    """

    def __init__(self, log_every: int, health_every: int):
        self.log_every, self.health_every = log_every, health_every
        self.cuda = torch.cuda.is_available()
        self.guarded = self.skipped = 0
        self.on = False

    def quiet(self, step: int) -> bool:
        return step % self.log_every != 0 and step % self.health_every != 0

    def enter(self, step: int) -> None:
        """Start guarding step ``step`` (1-based) if it is quiet."""
        self.exit()
        if not self.quiet(step):
            self.skipped += 1
            return
        self.guarded += 1
        self.on = True
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error")

    def exit(self) -> None:
        if self.on and self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self.on = False

    @contextlib.contextmanager
    def step(self, step: int):
        self.enter(step)
        try:
            yield
        finally:
            self.exit()

    def report(self) -> dict:
        note = {} if self.cuda else {"note": "no CUDA: the quiet steps were counted, not checked for syncs"}
        return {"guarded_steps": self.guarded, "unguarded_steps": self.skipped, "mode_enforced": self.cuda, **note}


def check_sync_custom_loop(device: str, epochs: int, logdir: Path) -> dict:
    args = plain_loop.parse_args(["--model", "mlp", "--epochs", str(epochs), "--device", device,
                                  "--monitor", "default", "--logdir", str(logdir)])
    guard = SyncGuard(plain_loop.LOG_EVERY, plain_loop.HEALTH["every_steps"])
    plain_loop.train(args, plain_loop.Timing(), step_guard=guard.step)
    return {"ok": True, **guard.report()}


def check_sync_trainer(device: str, epochs: int, logdir: Path) -> dict:
    from tbhealth.training.config import load_config
    from tbhealth.training.trainer import Trainer

    cfg = load_config(DIGITS, [f"device={device}", f"epochs={epochs}"])
    guard = SyncGuard(cfg.logging.every_steps, cfg.health.every_steps)

    class GuardedTrainer(Trainer):
        """Guards from a quiet step's batch copy to the next batch; validation is never guarded."""

        def forward_backward(self, x, y, scale):
            guard.enter(self.monitor.global_step + 1)
            return super().forward_backward(x, y, scale)

        def end_epoch(self, epoch):
            guard.exit()
            return super().end_epoch(epoch)

    run_dir = logdir / "trainer-sync"
    trainer = GuardedTrainer(cfg, run_dir, verbose=False)
    try:
        state = trainer.fit()
    finally:
        guard.exit()
    return {"ok": state == "completed", "state": state, "run_dir": str(run_dir), **guard.report()}


def nvml_readings(run_dir: str | None) -> dict:
    from tbhealth.monitor.system import sample_once

    status_path = Path(run_dir or ".") / "plugins" / "tbhealth" / "status.json"
    status = json.loads(status_path.read_text()) if run_dir and status_path.is_file() else {}
    return {"status_system_gpu": (status.get("system") or {}).get("gpu"),
            "direct_reading_gpu": sample_once(gpu_index=0, window=0.2).get("gpu")}


def ddp_job(logdir: Path, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "tbhealth_cli.app", "train", str(DIGITS), "--nproc-per-node", "1",
           "--set", "device=cuda", "--set", f"epochs={epochs}", "--logdir", str(logdir), "--name", "ddp", "--quiet"]
    t0 = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=logdir,
                            env=bench_overhead.child_env())
    status_path = logdir / "ddp" / "plugins" / "tbhealth" / "status.json"
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    return {"ok": result.returncode == 0 and status.get("state") == "completed", "exit_code": result.returncode,
            "seconds": round(time.monotonic() - t0, 1), "state": status.get("state"),
            "world_size": status.get("world_size"), "output_tail": (result.stdout + result.stderr)[-1500:]}


def ratio(rounds: int, epochs: int, tmp: Path) -> dict:
    names = ["plain loop", "train: defaults", "loop+Monitor: defaults"]
    return {model: bench_overhead.summarize(bench_overhead.overhead(model, names, rounds, epochs, tmp, "cuda"))
            for model in ("mlp", "cnn")}


def part(results: dict, key: str, fn, *args) -> dict:
    """Run one part into ``results[key]``; an exception (a sync under "error" mode too) is recorded
    with its traceback's tail instead of ending the check."""
    t0 = time.monotonic()
    try:
        results[key] = fn(*args)
    except Exception as e:
        results[key] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback_tail": traceback.format_exc()[-3000:]}
    print(f"[{key}] done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return results[key]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, fewer epochs")
    parser.add_argument("--rounds", type=int, help="interleaved rounds for the ratio (default 2; quick 1)")
    parser.add_argument("--out", help="JSON results file (default: $OUT/gpu_check.json when $OUT is set)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    device, epochs = ("cuda" if cuda else "cpu"), (1 if args.quick else 6)
    skip = "skipped: no CUDA device on this machine"
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA device)",
                     "torch": torch.__version__, "cuda": torch.version.cuda, "machine": bench_overhead.machine()}
    with tempfile.TemporaryDirectory(prefix="tbhealth-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        if cuda:
            part(results, "ratio", ratio, args.rounds or (1 if args.quick else 2), epochs, tmp)
        else:
            results["ratio"] = skip + " (benchmarks/bench_overhead.py measures the CPU ratio)"
        part(results, "sync_custom_loop", check_sync_custom_loop, device, epochs, tmp / "runs")
        trainer = part(results, "sync_trainer", check_sync_trainer, device, epochs, tmp / "runs")
        part(results, "nvml", nvml_readings, trainer.get("run_dir"))
        if not cuda:
            results["nvml"]["note"] = skip + ": system.gpu is null, as it should be"
        if cuda:
            part(results, "ddp", ddp_job, tmp, 2)
        else:
            results["ddp"] = skip + " (tests/test_distributed.py runs DDP on the CPU with Gloo)"
    write(results, args.out)
    return results


def write(results: dict, out: str | None) -> None:
    text = json.dumps(results, indent=2, default=str)
    print(text)
    path = Path(out) if out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    main()

"""``tbhealth train --nproc-per-node K``: hand the same command to PyTorch's own launcher.

We write no launcher or rendezvous of our own: ``torch.distributed.run`` (torchrun) starts K
workers per node, each running ``tbhealth train`` again without ``--nproc-per-node``; a worker
sees torchrun's environment (RANK, WORLD_SIZE, ...) and joins the process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def torchrun_args(nproc_per_node: int, nnodes: str = "1", node_rank: int = 0,
                  rdzv_endpoint: str | None = None) -> list[str]:
    """Launcher flags: a single node rendezvous by itself; several nodes meet at an endpoint."""
    args = [f"--nproc-per-node={nproc_per_node}"]
    if rdzv_endpoint:
        args += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--node-rank={node_rank}"]
    elif nnodes not in ("1", "1:1"):
        raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    else:
        args.append("--standalone")
    return args


def worker_args(config: Path, overrides: list[str], logdir: Path | None, name: str | None,
                resume: bool, quiet: bool) -> list[str]:
    args = ["-m", "tbhealth_cli.app", "train", str(config)]
    if logdir is not None:
        args += ["--logdir", str(logdir)]
    if name is not None:
        args += ["--name", name]
    for o in overrides:
        args += ["--set", o]
    if resume:
        args.append("--resume")
    if quiet:
        args.append("--quiet")
    return args


def launch(config: Path, overrides: list[str], logdir: Path | None, name: str | None, resume: bool, quiet: bool,
           *, nproc_per_node: int, nnodes: str = "1", node_rank: int = 0, rdzv_endpoint: str | None = None) -> int:
    """Run the job under torch.distributed.run and return its exit code."""
    from tbhealth_cli.common import ExitCode, fail

    try:
        launcher = torchrun_args(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    except ValueError as e:
        fail(str(e), code=ExitCode.USAGE)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher,
           *worker_args(config, overrides, logdir, name, resume, quiet)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    proc = subprocess.Popen(cmd, env=env)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731 - torchrun relays to workers
    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the terminal's Ctrl-C reached the workers too; wait for them
                continue
    finally:
        signal.signal(signal.SIGTERM, old)

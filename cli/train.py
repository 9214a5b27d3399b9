"""``tbhealth train``: validate a config, open a run, train it and say where to look."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tbhealth_cli.common import ExitCode, console, err_console, fail


def train(
    config: Annotated[Path, typer.Argument(help="YAML config file (see examples/).", show_default=False)],
    logdir: Annotated[Optional[Path], typer.Option("--logdir", envvar="TBHEALTH_LOGDIR", help="Folder for runs (default: the config's logdir, else runs).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name (default: the config's name, else the file's stem); made unique unless --resume.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set optimizer.lr=0.01 (value parsed as YAML). Repeatable.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the named run from its latest checkpoint.")] = False,
    nproc_per_node: Annotated[Optional[int], typer.Option("--nproc-per-node", min=1, help="Processes per node: run under torch.distributed (DDP).")] = None,
    nnodes: Annotated[str, typer.Option("--nnodes", help="Number of nodes (or MIN:MAX) for torch.distributed.run.")] = "1",
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank for a static multi-node launch.")] = 0,
    rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous for multi-node runs.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or per-epoch lines.")] = False,
    board: Annotated[bool, typer.Option("--board", help="Also serve TensorBoard (Health tab) on --port during training, and after it until Ctrl-C.")] = False,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port for --board.")] = 6006,
) -> None:
    """Train a PyTorch model from a YAML config, with live health monitoring.

    Writes TensorBoard scalars and text, checkpoints and run state to LOGDIR/NAME; watch it with
    [bold]tbhealth board[/] (the Health tab) and steer it with [bold]tbhealth pause|resume|stop|checkpoint NAME[/].

    Examples:

      [bold]tbhealth train examples/digits.yaml[/]

      [bold]tbhealth train examples/digits.yaml --board[/]   (open http://localhost:6006/#tbhealth)

      [bold]tbhealth train examples/digits.yaml --name lr-test --set optimizer.lr=0.01 --set epochs=30[/]

      [bold]tbhealth train examples/digits.yaml --name lr-test --resume --set epochs=40[/]

      [bold]tbhealth train examples/digits.yaml --nproc-per-node 2[/]
    """
    from tbhealth.training.config import ConfigError, load_config

    overrides = list(set_ or [])
    try:
        cfg = load_config(config, overrides)  # names, imports, signatures; the trainer's build judges values
        if nproc_per_node is not None:  # this process builds nothing: judge the values on stand-ins here
            from tbhealth.training import validation

            validation.check_config(cfg, dry_build=True)
    except ConfigError as e:
        fail(str(e), code=ExitCode.USAGE, hint="Fix the config (or the --set value) and run again; see README 'Config reference'.")
    if nproc_per_node is not None:
        from tbhealth_cli.launch import launch

        raise typer.Exit(launch(config, overrides, logdir, name, resume, quiet, nproc_per_node=nproc_per_node,
                                nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint))
    from tbhealth_cli.board import BoardBeside
    from tbhealth_cli.lifecycle import Lifecycle

    board_logdir = Path(logdir or cfg.logdir or "runs")
    try:
        tensorboard = BoardBeside(board_logdir, port) if board else None
    except OSError as e:
        logdir_failure(board_logdir, e)
    try:
        with Lifecycle(keep_sigterm=tensorboard is None) as life:  # --board: SIGTERM ends the board after the run
            code = run_training(cfg, config, logdir, name, resume, quiet, life)
    except BaseException:
        if tensorboard is not None:
            tensorboard.stop()
        raise
    if tensorboard is not None:
        tensorboard.serve_until_interrupted()
    from tbhealth import distributed

    if distributed.launched_by_torchrun():
        # A torchrun worker leaves without running C++ static destructors: at interpreter exit
        # c10d's background threads can still be joinable, and std::terminate would turn a clean
        # finish into SIGABRT (seen with Gloo under load). Everything is flushed and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    raise typer.Exit(int(code))


def run_training(cfg, config_path: Path, logdir: Path | None, name: str | None, resume: bool, quiet: bool,
                 life=None) -> int:
    """Build and run a Trainer; returns the exit code. Under torchrun, every worker runs this.

    ``life`` (a :class:`~tbhealth_cli.lifecycle.Lifecycle`) is told when set-up ends and training
    ends; a signal during set-up leaves no new run folder behind and exits 128 + its number."""
    from tbhealth.run.names import RunNameError, check_new_run_name, resolve_run, unique_run_dir
    from tbhealth.run.rundir import RunDir
    from tbhealth.run.states import State
    from tbhealth.training.config import ConfigError
    from tbhealth.training.preflight import check_device
    from tbhealth_cli.lifecycle import Lifecycle, SetupInterrupted

    life = life or Lifecycle()

    logdir = Path(logdir or cfg.logdir or "runs")
    origin = "--name" if name else ("the config's name" if cfg.name else f"the run name from {config_path.name}")
    name = name or cfg.name or config_path.stem
    try:
        resolve_run(logdir, check_new_run_name(name))
        check_device(cfg)
    except RunNameError as e:
        fail(f"{origin}: {e}", code=ExitCode.USAGE, hint="Pass another name with --name NAME.")
    except ConfigError as e:
        fail(str(e), code=ExitCode.USAGE)
    from tbhealth.training.checkpoint import CheckpointManager

    if resume and CheckpointManager(RunDir(logdir / name)).latest() is None:
        fail(f"--resume: no checkpoint in {logdir / name}/checkpoints to resume from.", code=ExitCode.USAGE,
             hint="Start it without --resume, or name an existing run with --name.")
    from tbhealth import distributed

    run_dir, created = None, False
    try:
        dist = distributed.init_from_env(cfg.device) if distributed.launched_by_torchrun() else None
        created = not resume and (dist is None or dist.is_main)
        try:
            run_dir = unique_run_dir(logdir, name) if created else logdir / name
        except OSError as e:  # a file, /proc, a read-only disk
            logdir_failure(logdir, e)
        if dist is not None:  # rank 0 picked the (unique) directory; everyone uses it
            run_dir = Path(dist.broadcast(str(run_dir)))
        trainer = _new_trainer(cfg, run_dir, created, resume=resume, quiet=quiet, dist=dist)
        life.training(trainer.monitor)
    except SetupInterrupted as e:
        if run_dir is not None:
            _discard(run_dir, created)
        err_console.print(f"[red]Interrupted[/] during set-up ({e}); no run was started.")
        return e.exit_code
    clean = False
    try:
        state = trainer.fit()
        clean = True
        life.ended()
    except KeyboardInterrupt:
        err_console.print("[red]Aborted[/] by a second interrupt; no checkpoint written for the current step.")
        return ExitCode.ABORTED
    except Exception as e:
        log = trainer.run.log_path
        fail(f"training failed: {type(e).__name__}: {e}", code=ExitCode.FAILED,
             hint=f"The traceback is in {log}; the run's state is 'failed'.")
    finally:
        if dist is not None:
            distributed.shutdown(dist, clean=clean)
    if state == State.FAILED.value:  # the loop ended without an exception: a full disk stopped it
        fail(f"training failed: {trainer.monitor.progress.message}", code=ExitCode.FAILED,
             hint=f"The run's state is 'failed'; its last checkpoint is in {trainer.run.checkpoint_dir}.")
    if trainer.rank == 0 and not quiet:
        print_summary(trainer, state, logdir)
    return ExitCode.OK


def _new_trainer(cfg, run_dir: Path, created: bool, *, resume: bool, quiet: bool, dist):
    """The run's Trainer; a set-up error removes the run folder this command created, and exits."""
    from tbhealth.training.checkpoint import CheckpointFormatError
    from tbhealth.training.config import ConfigError
    from tbhealth.training.trainer import Trainer

    try:
        return Trainer(cfg, run_dir, resume=resume, verbose=not quiet, dist=dist)
    except (ConfigError, CheckpointFormatError) as e:
        _discard(run_dir, created)
        fail(str(e), code=ExitCode.USAGE)
    except Exception as e:  # the user's data or model factory failed
        _discard(run_dir, created)
        fail(f"could not set up training: {type(e).__name__}: {e}", code=ExitCode.FAILED)


def print_summary(trainer, state: str, logdir: Path) -> None:
    hist = trainer.monitor.history
    last = hist[-1] if hist else {}
    acc = last.get("val_acc")
    console.print(
        f"\n[bold]Run {state}[/] after {len(hist)} epoch(s)"
        + (f": val_loss {last['val_loss']:.4f}" if last.get("val_loss") is not None else "")
        + (f", val_acc {acc * 100:.2f}%" if acc is not None else "")
    )
    console.print(f"Run directory: {trainer.run.path}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"Open the Health tab:  tbhealth board {logdir}    (or: tensorboard --logdir {logdir})",
                  markup=False, highlight=False, soft_wrap=True)


def logdir_failure(logdir: Path, e: OSError) -> None:
    """Exit 2 for a --logdir no run can live in (a file, under /proc, on a read-only disk)."""
    why = "it is a file, not a folder" if os.path.isfile(logdir) else (e.strerror or str(e))
    fail(f"cannot create a run folder under --logdir {os.fspath(logdir)!r}: {why}", code=ExitCode.USAGE,
         hint="Pass a folder you can write to with --logdir (or set TBHEALTH_LOGDIR).")


def _discard(run_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)

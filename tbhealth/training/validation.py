"""Is a config runnable? Found before anything is built, every problem at once, each under its key.

:func:`config_problems` checks names, import paths and keyword arguments against signatures
(``load_config`` runs it): nothing is constructed. Values only a constructor judges
(``betas: [0.9, 2]``, ``activation: rleu``) surface from the real build, with the same message
and key; :func:`dry_build_problems` finds them on stand-ins in a process that builds nothing
itself (the launcher of a distributed job), so such a job fails before it spawns its workers.
"""

from __future__ import annotations

import torch

from tbhealth.training.config import Config, ConfigError, Problem
from tbhealth.training.registry import (
    MODEL_BUILTINS, MODEL_INFERRED, build_optimizer, build_scheduler, call_with, check_names, data_factory,
    is_plateau_class, kwargs_problems, model_factory, optimizer_class, scheduler_class, scheduler_kwargs,
)

__all__ = ["check_config", "config_problems", "dry_build_problems"]


def config_problems(cfg: Config) -> list[Problem]:
    """Everything wrong with ``cfg`` that shows without building anything: names, imports, signatures.

    Values only a constructor judges (``betas: [0.9, 2]``, ``activation: rleu``) are left to the
    real build, whose builders raise the same ConfigError; :func:`dry_build_problems` finds them
    in a process that will not build (the launcher of a distributed job).
    """
    problems = check_names(cfg.model_dump())
    if problems:
        return problems
    problems = _factory_problems(cfg) + _optimization_problems(cfg)
    if cfg.scheduler.monitor.endswith("_acc") and cfg.resolved_task == "regression":
        problems.append(Problem("scheduler.monitor", f"{cfg.scheduler.monitor!r} needs accuracy, which a regression "
                                                     "task does not compute; use val_loss or train_loss, or set task"))
    return problems


def _factory_problems(cfg: Config) -> list[Problem]:
    data_fn, model_fn = data_factory(cfg.data.source), model_factory(cfg.model.source)
    problems = kwargs_problems(data_fn, cfg.data.kwargs, {"val_fraction", "seed"}, "data.kwargs", cfg.data.source)
    return problems + kwargs_problems(model_fn, cfg.model.kwargs, set(MODEL_INFERRED), "model.kwargs", cfg.model.source)


def _optimization_problems(cfg: Config) -> list[Problem]:
    """Optimizer and scheduler kwargs bound against the classes' signatures (nothing constructed)."""
    if "lr" in cfg.optimizer.kwargs:
        return [Problem("optimizer.kwargs.lr", "set the learning rate as optimizer.lr, not in kwargs")]
    opt_cls = optimizer_class(cfg.optimizer.name)
    problems = kwargs_problems(opt_cls, cfg.optimizer.kwargs, {"params", "lr"}, "optimizer.kwargs", cfg.optimizer.name)
    sched_cls = scheduler_class(cfg.scheduler.name) if cfg.scheduler.name else None
    if sched_cls is not None:
        kwargs = scheduler_kwargs(cfg, sched_cls, 1)
        problems += kwargs_problems(sched_cls, kwargs, {"optimizer"}, "scheduler.kwargs", cfg.scheduler.name)
        if is_plateau_class(sched_cls) and cfg.scheduler.interval == "step":
            problems.append(Problem("scheduler.interval", f"{cfg.scheduler.name} steps on an epoch metric "
                                                          "(scheduler.monitor); use interval: epoch (got 'step')"))
    return problems


def dry_build_problems(cfg: Config) -> list[Problem]:
    """What the real build would reject, found on stand-ins, for a process that builds nothing itself.

    A built-in model is built with stand-in sizes (activation, norm...), the optimizer on one
    stand-in parameter and the scheduler on that optimizer. No data is built. Run it only after
    :func:`config_problems` found nothing.
    """
    problems: list[Problem] = []
    if cfg.model.source in MODEL_BUILTINS:
        stand_in = {"in_features": 4, "in_channels": 1} | ({} if "num_classes" in cfg.model.kwargs else {"out_features": 2})
        try:
            call_with(model_factory(cfg.model.source), stand_in | dict(cfg.model.kwargs), "model.kwargs",
                  cfg.model.source, only_accepted=True)
        except ConfigError as e:
            problems += e.problems
    try:
        optimizer = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2, 2))])
        build_scheduler(cfg, optimizer, 1)
    except ConfigError as e:
        problems += e.problems
    return problems


def check_config(cfg: Config, *, dry_build: bool = False) -> None:
    """Raise one ConfigError listing every problem :func:`config_problems` finds (a no-op after
    load_config); ``dry_build``: also what :func:`dry_build_problems` finds."""
    problems = config_problems(cfg)
    if not problems and dry_build:
        problems = dry_build_problems(cfg)
    if problems:
        raise ConfigError(problems)

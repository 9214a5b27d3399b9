"""From names in a :class:`~tbhealth.training.config.Config` to objects: data, model, loss, optimizer, scheduler.

A name is either built in (``digits``, ``mlp``, ``Adam``, ``CrossEntropyLoss``...) or an import
path ``package.module:attribute``. Everything that can go wrong because of what the user wrote
raises :class:`~tbhealth.training.config.ConfigError` naming the key (``optimizer.kwargs.betas``), never a
traceback. :mod:`tbhealth.training.validation` checks a config with these resolvers and the
signatures of what they find, without building anything; what only a constructor can judge
surfaces from the real build (the trainer's) with the same message and key. Nothing is built twice.

Factories only receive what they ask for: a data factory gets ``val_fraction`` and ``seed`` and
a model factory gets ``input_shape``, ``in_features``, ``in_channels``, ``out_features`` or
``num_classes`` (from the data) only when its signature names them and ``kwargs`` does not
set them, so ``def make(): return train, val`` is a valid data factory.

Scheduler defaults filled in when ``kwargs`` leaves them out (so the common cases need no
arithmetic): ``OneCycleLR`` gets ``max_lr = optimizer.lr`` and ``total_steps``, and
``CosineAnnealingLR`` gets ``T_max``: ``epochs`` for ``interval: epoch``, ``epochs ×
steps_per_epoch`` for ``interval: step``. Others that count steps (``LinearLR.total_iters``...)
take their counts from ``kwargs`` in units of the interval. ``ReduceLROnPlateau`` defaults to
``mode: max`` when ``scheduler.monitor`` is an accuracy; the trainer calls ``step(metric)``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
from torch.optim import lr_scheduler
from torch.utils.data import Dataset

from tbhealth.training.config import Config, ConfigError, Problem, did_you_mean
from tbhealth.training.data import count_classes
from tbhealth.training.models import FunctionLoss

__all__ = [
    "DATA_BUILTINS", "MODEL_BUILTINS", "DataBundle", "FunctionLoss", "build_data", "build_loss", "build_model",
    "build_optimizer", "build_scheduler", "check_names",
    "import_object", "is_plateau", "loss_names", "optimizer_names", "scheduler_names",
]

DATA_BUILTINS = {
    "digits": "tbhealth.training.data:digits",
    "synthetic_classification": "tbhealth.training.data:synthetic_classification",
    "synthetic_regression": "tbhealth.training.data:synthetic_regression",
}
MODEL_BUILTINS = {"mlp": "tbhealth.training.models:MLP", "cnn": "tbhealth.training.models:CNN"}
MODEL_INFERRED = ("input_shape", "in_features", "in_channels", "out_features", "num_classes")


@dataclass
class DataBundle:
    """The two datasets and what a model needs to know about their samples."""

    train: Dataset
    val: Dataset
    input_shape: tuple[int, ...]
    num_classes: int | None
    task: str
    target_shape: tuple[int, ...] = ()



def import_object(path: str, key: str) -> Any:
    """``package.module:attr.sub`` -> the object; the working directory is importable too."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(Problem(key, f"{path!r} is not an import path; write 'package.module:function'"))
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())  # `tbhealth train` from a project folder, like `python -m`
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(Problem(key, f"cannot import module {module_name!r} (from {path!r}): {e}. "
                                       "Is it installed, or in the current directory?")) from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(Problem(key, f"importing {module_name!r} (from {path!r}) failed: "
                                       f"{type(e).__name__}: {e}")) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(Problem(key, f"{path!r}: {getattr(obj, '__name__', module_name)!r} has no "
                                           f"attribute {part!r}.{did_you_mean(part, names)}"))
        obj = getattr(obj, part)
    return obj


def _callable(path: str, key: str) -> Callable:
    obj = import_object(path, key)
    if not callable(obj):
        raise ConfigError(Problem(key, f"{path!r} is a {type(obj).__name__}, not a function or class"))
    return obj


def _source(source: str, key: str, builtins: dict[str, str], what: str) -> Callable:
    if ":" in source:
        return _callable(source, key)
    if source not in builtins:
        raise ConfigError(Problem(key, f"unknown built-in {what} {source!r}.{did_you_mean(source, list(builtins))} "
                                       f"Built-ins: {', '.join(builtins)}; or an import path 'package.module:function'"))
    return import_object(builtins[source], key)


def data_factory(source: str) -> Callable:
    return _source(source, "data.source", DATA_BUILTINS, "data")


def model_factory(source: str) -> Callable:
    return _source(source, "model.source", MODEL_BUILTINS, "model")


def _subclasses(module: Any, *bases: type) -> list[str]:
    """Public classes of ``module`` derived from ``bases`` (the abstract bases themselves excluded)."""
    return sorted(n for n, v in vars(module).items()
                  if not n.startswith("_") and isinstance(v, type) and issubclass(v, bases)
                  and v not in (torch.optim.Optimizer, lr_scheduler.LRScheduler, torch.nn.modules.loss._Loss))


@lru_cache(maxsize=1)
def optimizer_names() -> list[str]:
    return _subclasses(torch.optim, torch.optim.Optimizer)


@lru_cache(maxsize=1)
def scheduler_names() -> list[str]:
    return _subclasses(lr_scheduler, lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)


@lru_cache(maxsize=1)
def loss_names() -> list[str]:
    return _subclasses(torch.nn, torch.nn.modules.loss._Loss)


def _named(name: str, key: str, names: list[str], module: Any, what: str, bases: tuple[type, ...] = ()) -> Any:
    """A class named in ``module`` or an import path (to a subclass of ``bases`` when given)."""
    if ":" in name:
        obj = _callable(name, key)
        if bases and not (isinstance(obj, type) and issubclass(obj, bases)):
            raise ConfigError(Problem(key, f"{name!r} is not a {bases[0].__module__}.{bases[0].__name__} subclass"))
        return obj
    if name not in names:
        raise ConfigError(Problem(key, f"unknown {what} {name!r}.{did_you_mean(name, names)} Allowed: {', '.join(names)}"
                                       "; or an import path 'package.module:name'"))
    return getattr(module, name)


def optimizer_class(name: str) -> type:
    return _named(name, "optimizer.name", optimizer_names(), torch.optim, "optimizer", (torch.optim.Optimizer,))


def scheduler_class(name: str) -> type:
    return _named(name, "scheduler.name", scheduler_names(), lr_scheduler, "scheduler",
                  (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))


def loss_object(name: str) -> Any:
    """A torch.nn loss class, or whatever callable the import path names (class or function)."""
    return _named(name, "loss", loss_names(), torch.nn, "loss")



def check_names(d: dict) -> list[Problem]:
    """Problems with every name/import path in a config dict (raw or dumped); absent keys are skipped."""
    checks = [(("optimizer", "name"), optimizer_class), (("scheduler", "name"), scheduler_class),
              (("loss",), loss_object), (("data", "source"), data_factory), (("model", "source"), model_factory)]
    problems: list[Problem] = []
    for path, resolve in checks:
        value: Any = d
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            try:
                resolve(value)
            except ConfigError as e:
                problems += e.problems
    return problems


def _torchcall_with(build: Callable[[], Any], key: str, label: str) -> Any:
    """``build()``, any error becoming a ConfigError under ``key``: torch checks some values with
    asserts or indexing, not ValueError, and a bad optimizer/scheduler value is the user's mistake."""
    try:
        return build()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(Problem(key, f"{label!r} rejected its arguments: {type(e).__name__}: {e}")) from None


def _params(fn: Callable) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None  # some C callables have no signature: nothing to check


def kwargs_problems(fn: Callable, kwargs: dict, provided: set[str], key: str, label: str) -> list[Problem]:
    params = _params(fn)
    if params is None:
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [n for n, p in params.items() if p.kind in kinds]
    problems = []
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [n for n in named if n not in provided]
        for k in kwargs:
            if k not in named:
                problems.append(Problem(f"{key}.{k}", f"{label!r} takes no argument {k!r}.{did_you_mean(k, allowed)} "
                                                      f"Allowed: {', '.join(allowed) or '(none)'}"))
    for n in named:
        p = params[n]
        if p.default is p.empty and n not in kwargs and n not in provided:
            problems.append(Problem(key, f"{label!r} needs argument {n!r}: add it under {key}"))
    return problems


def call_with(fn: Callable, kwargs: dict, key: str, label: str, only_accepted: bool = False) -> Any:
    """``fn(**kwargs)``; a TypeError/ValueError (bad argument) becomes a ConfigError naming ``key``."""
    if only_accepted and (params := _params(fn)) is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        first = str(e).split(" ", 1)[0].split("[", 1)[0]  # "activation must be ..." -> model.kwargs.activation
        raise ConfigError(Problem(f"{key}.{first}" if first in kwargs else key,
                                  f"{label!r} rejected its arguments: {e}")) from None


def _checked_call(fn: Callable, kwargs: dict, key: str, label: str) -> Any:
    """Like :func:`_call`, but unknown/missing arguments are named one by one first."""
    if problems := kwargs_problems(fn, kwargs, set(), key, label):
        raise ConfigError(problems)
    return call_with(fn, kwargs, key, label)



def build_data(cfg: Config, seed: int | None = None) -> DataBundle:
    """Call the data factory and describe what it returned (shapes, number of classes).

    ``seed`` replaces ``cfg.seed`` (pass the seed actually drawn when ``cfg.seed`` is null, so a
    resumed run gets the same train/val split).
    """
    factory = data_factory(cfg.data.source)
    params = _params(factory) or {}
    kwargs = dict(cfg.data.kwargs)
    for name, value in (("val_fraction", cfg.data.val_fraction), ("seed", cfg.seed if seed is None else seed)):
        if name in params and name not in kwargs:
            kwargs[name] = value
    result = _checked_call(factory, kwargs, "data.kwargs", cfg.data.source)
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(d, Dataset) for d in result)):
        raise ConfigError(Problem("data.source", f"{cfg.data.source!r} must return (train_dataset, val_dataset) of "
                                                 f"torch.utils.data.Dataset, got {type(result).__name__}"))
    train, val = result
    if len(train) == 0:
        raise ConfigError(Problem("data.source", f"{cfg.data.source!r} returned an empty training set"))
    sample = train[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise ConfigError(Problem("data.source", "each sample must be an (input, target) pair"))
    x, y = (torch.as_tensor(v) for v in sample)
    task = cfg.resolved_task
    num_classes = count_classes(train, val) if task == "classification" else None
    return DataBundle(train, val, tuple(x.shape), num_classes, task, tuple(y.shape))


def build_model(cfg: Config, bundle: DataBundle) -> torch.nn.Module:
    """Call the model factory; sizes it asks for and ``kwargs`` lacks come from ``bundle``."""
    source = cfg.model.source
    factory = model_factory(source)
    params = _params(factory) or {}
    kwargs = dict(cfg.model.kwargs)
    out = bundle.num_classes if bundle.task == "classification" else math.prod(bundle.target_shape or (1,))
    inferred = {"input_shape": bundle.input_shape, "in_features": math.prod(bundle.input_shape),
                "in_channels": bundle.input_shape[0] if bundle.input_shape else None,
                "out_features": out, "num_classes": bundle.num_classes}
    if "out_features" in params:
        inferred.pop("num_classes")  # one output size, under the name the factory prefers
    if "num_classes" in kwargs:
        inferred.pop("out_features")
    for name, value in inferred.items():
        if name in params and name not in kwargs:
            if name == "in_channels" and len(bundle.input_shape) < 2:
                raise ConfigError(Problem("model.source", f"{source!r} needs image-shaped samples (channels, height, "
                                          f"width) but the data gives {bundle.input_shape}; for digits set "
                                          "data.kwargs.as_images: true"))
            if value is None:
                raise ConfigError(Problem(f"model.kwargs.{name}", "cannot infer it from the data; set it"))
            kwargs[name] = value
    model = _checked_call(factory, kwargs, "model.kwargs", source)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(Problem("model.source", f"{source!r} must return a torch.nn.Module, "
                                                  f"got {type(model).__name__}"))
    return model


def build_loss(cfg: Config) -> torch.nn.Module:
    """The loss as a module: a torch.nn class is instantiated, a plain function is wrapped."""
    obj = loss_object(cfg.loss)
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return call_with(obj, {}, "loss", cfg.loss)
    if isinstance(obj, torch.nn.Module):
        return obj
    return FunctionLoss(obj)


def build_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    cls, key, label = optimizer_class(cfg.optimizer.name), "optimizer.kwargs", cfg.optimizer.name
    build = lambda **kw: cls(params, lr=cfg.optimizer.lr, **kw)  # noqa: E731
    return _torchcall_with(lambda: call_with(build, dict(cfg.optimizer.kwargs), key, label), key, label)


def scheduler_kwargs(cfg: Config, cls: type, steps_per_epoch: int) -> dict:
    kwargs = dict(cfg.scheduler.kwargs)
    span = cfg.epochs * (steps_per_epoch if cfg.scheduler.interval == "step" else 1)
    if cls.__name__ == "OneCycleLR":
        kwargs.setdefault("max_lr", cfg.optimizer.lr)
        if not {"total_steps", "epochs", "steps_per_epoch"} & kwargs.keys():
            kwargs["total_steps"] = span
    elif cls.__name__ == "CosineAnnealingLR":
        kwargs.setdefault("T_max", span)
    elif is_plateau_class(cls):
        kwargs.setdefault("mode", "max" if cfg.scheduler.monitor.endswith("_acc") else "min")
    return kwargs


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any | None:
    """The LR scheduler, or None. ``steps_per_epoch`` counts optimizer steps (batches / accumulate_steps)."""
    if not cfg.scheduler.name:
        return None
    cls, key, label = scheduler_class(cfg.scheduler.name), "scheduler.kwargs", cfg.scheduler.name
    kwargs = scheduler_kwargs(cfg, cls, max(1, steps_per_epoch))
    return _torchcall_with(lambda: call_with(lambda **kw: cls(optimizer, **kw), kwargs, key, label), key, label)


def is_plateau_class(cls: type) -> bool:
    return issubclass(cls, lr_scheduler.ReduceLROnPlateau)


def is_plateau(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` wants the monitored metric (``step(metrics[cfg.scheduler.monitor])``)."""
    return scheduler is not None and is_plateau_class(type(scheduler))

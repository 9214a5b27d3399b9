"""The run config: one pydantic model per YAML section, loading, ``--set`` overrides, errors.

Precedence, lowest to highest: **defaults** (the field defaults below) < **the YAML file** <
**``--set key.path=value``** overrides (applied in order, so a later ``--set`` wins).

Every mistake a user can make in a config ends as one :class:`ConfigError` whose ``str()`` is the
whole user-facing message: each problem on its own line with where it is (``file:line:col`` or
the ``--set`` that caused it), the dotted key path, the bad value and what is allowed. Checks that
need torch or user code (optimizer/scheduler/loss names, import paths, kwargs that a factory
does not accept) live in :mod:`tbhealth.training.registry` and run from :func:`config_from_dict`
without building anything: a value that only a constructor judges (Adam's ``betas``, an MLP's
``activation``) is reported, in the same form, by the build itself (the trainer's), so nothing is
built twice at start-up. Importing this module does not import torch.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tbhealth.health.settings import HealthConfig
from tbhealth.run.names import NEW_RUN_NAME, NEW_RUN_NAME_RULE
from tbhealth.training import yaml_source

__all__ = ["CLASSIFICATION_LOSSES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig",
           "ModelConfig", "OptimizerConfig", "Problem", "SchedulerConfig", "apply_overrides", "config_from_dict",
           "did_you_mean", "dump_config", "load_config"]

#: Losses (torch.nn class names or the last part of an import path) that make ``task: auto``
#: mean classification; anything else is regression unless ``task`` says otherwise.
CLASSIFICATION_LOSSES = frozenset({
    "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "BCELoss", "MultiMarginLoss",
    "MultiLabelMarginLoss", "MultiLabelSoftMarginLoss", "SoftMarginLoss",
    "cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
})

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,4})$")
#: Largest whole number a config key takes (torch and numpy take 64-bit integers).
_MAX_INT = 2**63 - 1



@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config. ``where`` is ``file:line:col`` or ``--set ...`` when known."""

    path: str
    message: str
    where: str = ""

    def __str__(self) -> str:
        head = ": ".join(p for p in (self.where, self.path) if p)
        return f"{head}: {self.message}" if head else self.message


class ConfigError(Exception):
    """An invalid config; ``str()`` is the complete message for the user (never a traceback)."""

    def __init__(self, problems: str | Problem | Sequence[Problem], source: str | None = None):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.source = source
        n = len(self.problems)
        head = f"Invalid config{f' {source}' if source else ''} ({n} problem{'s' if n != 1 else ''}):"
        super().__init__("\n  ".join([head, *map(str, self.problems)]))


def did_you_mean(value: Any, allowed: Sequence[str]) -> str:
    """`` Did you mean 'Adam'?`` (leading space) for a near miss, else an empty string."""
    text = str(value)
    exact = [a for a in allowed if a.lower() == text.lower()]
    close = exact or difflib.get_close_matches(text, list(allowed), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""



class _Section(BaseModel):
    """Unknown keys fail; assignment re-validates (the CLI sets ``name``/``logdir`` after loading);
    numbers must be finite (``1e400`` is infinity in YAML) and whole numbers fit in 64 bits."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_64_bits(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > _MAX_INT:
            raise ValueError(f"must be between {-_MAX_INT} and {_MAX_INT}")
        return v

    @field_validator("kwargs", mode="before", check_fields=False)
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class DataConfig(_Section):
    source: str = Field("digits", description="Built-in data name or import path 'package.module:function'.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the data factory.")
    batch_size: int = Field(64, gt=0, le=2**24, description="Samples per batch (samples; at most 16777216).")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of built-in data held out (fraction 0–1).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the main process).")


class ModelConfig(_Section):
    source: str = Field("mlp", description="Built-in model name or import path 'package.module:function'.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the model factory.")


class OptimizerConfig(_Section):
    name: str = Field("Adam", description="torch.optim class name, or import path to an Optimizer subclass.")
    lr: float = Field(1e-3, gt=0, description="Learning rate (the optimizer's units).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="More optimizer arguments (not lr).")


class SchedulerConfig(_Section):
    name: str | None = Field(None, description="torch.optim.lr_scheduler class name, import path, or null (none).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Scheduler arguments (not the optimizer).")
    monitor: Literal["val_loss", "val_acc", "train_loss", "train_acc"] = Field(
        "val_loss", description="Epoch metric ReduceLROnPlateau watches.")
    interval: Literal["epoch", "step"] = Field("epoch", description="Step the scheduler once per epoch or per optimizer step.")


class CheckpointConfig(_Section):
    every_epochs: int = Field(1, ge=0, description="Save every N epochs (epochs; 0: only last and best).")
    keep_last: int = Field(3, ge=1, description="Periodic checkpoints kept on disk (files).")


class LoggingConfig(_Section):
    every_steps: int = Field(50, ge=1, description="Read step loss/grad norm off the device every N steps (steps); 50 keeps the read-back under 1 % of a 2 ms step.")


_SECTIONS = ("data", "model", "optimizer", "scheduler", "checkpoint", "health", "logging")


class Config(_Section):
    """A whole run. Field defaults are the lowest layer of the precedence (see the module doc)."""

    name: str | None = Field(None, description="Run name (letters, digits, _.-); null: generated.")
    logdir: str = Field("runs", description="Folder that holds the runs (path).")
    seed: int | None = Field(0, ge=0, le=2**32 - 1, description="Seed for torch, data split and built-in data, 0 to 4294967295 (null: random).")
    epochs: int = Field(10, ge=1, description="Passes over the training data (epochs).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: cuda when available).")
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", description="auto: classification for class losses (CrossEntropyLoss...), else regression.")
    data: DataConfig = Field(default_factory=DataConfig, description="Where the samples come from.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="What is trained.")
    loss: str = Field("CrossEntropyLoss", description="torch.nn loss class name or import path 'pkg.mod:fn'.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="How weights move.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="How the LR changes.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="When to save.")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health rules: thresholds and actions.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="How often step values are read.")
    amp: bool = Field(False, description="Automatic mixed precision on CUDA (ignored on CPU).")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient L2 norm to this (null: off).")
    accumulate_steps: int = Field(1, ge=1, description="Batches per optimizer step (batches).")

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `scheduler:` with nothing under it is YAML null: mean "defaults", not "not a mapping".
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in _SECTIONS and v is None)}
        return data

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and not NEW_RUN_NAME.match(v):
            raise ValueError(f"must be {NEW_RUN_NAME_RULE}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError("must be auto, cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0)")
        return v

    @property
    def resolved_task(self) -> Literal["classification", "regression"]:
        """``task`` with ``auto`` decided by the loss (classification losses compute accuracy)."""
        if self.task != "auto":
            return self.task
        last = self.loss.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        return "classification" if last in CLASSIFICATION_LOSSES else "regression"



def _parse_yaml(text: str, filename: str) -> tuple[Any, dict[tuple, str]]:
    """The document and ``{key path: 'file:line:col'}`` for every mapping key in it."""
    try:
        return yaml_source.parse(text, filename)
    except yaml_source.YamlProblem as e:
        raise _config_error(e) from None


def _config_error(e: yaml_source.YamlProblem) -> ConfigError:
    return ConfigError(Problem(_dotted(e.path), e.message, e.where))


def _parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(Problem("", "expected key.path=value, e.g. --set optimizer.lr=3e-4", f"--set {text}"))
    try:
        value = yaml_source.parse_value(raw, f"--set {text}") if raw.strip() else None
    except yaml_source.YamlProblem as e:
        raise _config_error(e) from None
    return tuple(p.strip() for p in parts), value


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (m := _model_of(arg)) is not None:
                return m
    return None


def _schema_at(parts: Sequence[Any], text: str | None = None) -> Any:
    """The annotation at ``parts`` below Config; ``kwargs`` (any free dict) takes any key.

    An unknown key gives None, or with ``text`` (the ``--set`` being checked) a ConfigError.
    """
    annotation: Any = Config
    for i, part in enumerate(parts):
        model = _model_of(annotation)
        if model is None and (typing.get_origin(annotation) is dict or annotation in (dict, Any)):
            args = typing.get_args(annotation)
            annotation = args[1] if len(args) == 2 else Any
        elif model is not None and part in model.model_fields:
            annotation = model.model_fields[part].annotation
        elif text is None:
            return None
        elif model is None:
            raise ConfigError(Problem(_dotted(parts[:i]), f"is a single value, it has no key {part!r}", f"--set {text}"))
        else:
            raise ConfigError(Problem(_dotted(parts[: i + 1]), _unknown_key(parts[:i], part), f"--set {text}"))
    return annotation


def _unknown_key(parent: Sequence[Any], key: Any) -> str:
    model = _model_of(_schema_at(parent))
    allowed = list(model.model_fields) if model else []
    return (f"unknown key {key!r} under {_dotted(parent) or 'the top level'}.{did_you_mean(key, allowed)}"
            f" Allowed: {', '.join(allowed)}")


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``d`` with each ``key.path=value`` set (value parsed as YAML: 3, 1e-3, [1, 2], null)."""
    out = copy.deepcopy(d)
    for text in overrides:
        parts, value = _parse_override(text)
        _schema_at(parts, text)
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out



def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and fully check a YAML config (see the module doc for the precedence)."""
    try:
        return _load(Path(path), overrides)
    except ConfigError as e:
        if e.source:
            raise
        raise ConfigError(e.problems, source=str(path)) from None


def _load(p: Path, overrides: Sequence[str]) -> Config:
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(Problem("", f"config file not found: {str(p)!r} (looked in {Path.cwd()})")) from None
    except IsADirectoryError:
        raise ConfigError(Problem("", f"{str(p)!r} is a directory; give a YAML file")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(Problem("", f"cannot read {str(p)!r}: {e}")) from None
    data, positions = _parse_yaml(text, str(p))
    if data is None:
        data = {}  # an empty file means "all defaults"
    if not isinstance(data, dict):
        raise ConfigError(Problem("", f"the top level must be a mapping of keys ({', '.join(Config.model_fields)}), "
                                      f"got a {type(data).__name__}", f"{p}:1:1"))
    data = apply_overrides(data, overrides)
    for text_ in overrides:
        parts = tuple(s.strip() for s in text_.partition("=")[0].split("."))
        for key in [k for k in positions if k[: len(parts)] == parts]:
            del positions[key]
        positions[parts] = f"--set {text_}"
    return config_from_dict(data, source=str(p), positions=positions)


def config_from_dict(d: dict, source: str = "<dict>", positions: dict[tuple, str] | None = None) -> Config:
    """Validate ``d`` and check names, import paths and kwargs against signatures (nothing is built)."""
    from tbhealth.training import registry, validation  # import torch; only when something is validated

    positions = positions or {}
    if not isinstance(d, dict):
        raise ConfigError(Problem("", f"a config must be a mapping, got {type(d).__name__}"), source=source)
    try:
        cfg = Config.model_validate(d)
    except ValidationError as e:
        problems = [_problem_from_pydantic(err) for err in e.errors()]
        reported = {p.path for p in problems}
        problems += [p for p in registry.check_names(d) if p.path not in reported]
        raise ConfigError(_locate(problems, positions), source=source) from None
    problems = validation.config_problems(cfg)
    if problems:
        raise ConfigError(_locate(problems, positions), source=source)
    return cfg


def dump_config(cfg: Config) -> str:
    """YAML of the resolved config (defaults filled in); loading it gives back an equal Config."""
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: the same text, ~10x faster
    body = yaml.dump(cfg.model_dump(mode="json", by_alias=True), Dumper=dumper, sort_keys=False, allow_unicode=True)
    return f"# tbhealth config as resolved (defaults < file < --set); task resolves to {cfg.resolved_task}\n{body}"



def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem_from_pydantic(err: dict) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return Problem(_dotted(loc), _unknown_key(loc[:-1], loc[-1]))
    msg = msg.removeprefix("Value error, ").replace("Input should be", "must be")
    if kind == "missing":
        return Problem(_dotted(loc), "required key is missing")
    if not isinstance(value, (dict, list)):
        shown = repr(value)
        msg += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return Problem(_dotted(loc), msg)


def _locate(problems: list[Problem], positions: dict[tuple, str]) -> list[Problem]:
    """Attach ``file:line:col`` (or the ``--set``) of the deepest known key to each problem."""
    by_dotted = {_dotted(k): v for k, v in positions.items()}
    out = []
    for p in problems:
        where, path = p.where, p.path
        while not where and path:
            where = by_dotted.get(path, "")
            path = re.sub(r"(^|\.)[^.\[\]]*$|\[\d+\]$", "", path)  # one level up
        out.append(Problem(p.path, p.message, where))
    return sorted(out, key=_line_of)


def _line_of(p: Problem) -> tuple[int, int]:
    """File problems in file order, then ``--set`` ones, then the rest (stable within each)."""
    m = re.search(r":(\d+):(\d+)$", p.where)
    return (0, int(m.group(1))) if m else (1 if p.where else 2, 0)

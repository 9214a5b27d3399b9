"""YAML as the config reads it: where each key is, duplicate keys refused, and bounded.

A config file (and each ``--set`` value) is YAML written by a person, a script or somebody else.
YAML aliases let a few hundred bytes stand for a billion values (``&a [...]`` repeated by
``[*a, *a, …]`` nine levels deep) or for an infinite one (``&a [*a]``); everything after parsing
(key positions, validation, deep copies) walks the expanded tree. So the composed document is
checked first, without recursion: at most :data:`MAX_YAML_VALUES` values once aliases are
followed, at most :data:`MAX_YAML_DEPTH` levels, no alias inside itself. Problems come back as
:class:`YamlProblem` (message, ``file:line:col``, key path); :mod:`tbhealth.training.config`
turns them into its ``ConfigError``. No torch here.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

#: Values a document may expand to once aliases are followed; a config has a few hundred.
MAX_YAML_VALUES = 100_000
#: Levels a document may nest; a config has four.
MAX_YAML_DEPTH = 64


class YamlProblem(Exception):
    """``message`` at ``where`` (``file:line:col``), about the key at ``path`` (a tuple, maybe empty)."""

    def __init__(self, message: str, where: str, path: tuple = ()):
        super().__init__(message)
        self.message, self.where, self.path = message, where, path


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse(text: str, filename: str) -> tuple[Any, dict[tuple, str]]:
    """The document and ``{key path: 'file:line:col'}`` for every mapping key in it."""
    try:
        return _load(text, filename)
    except yaml.MarkedYAMLError as e:
        mark, ctx = e.problem_mark or e.context_mark, e.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        what = str(e.problem or "")
        if e.context:
            started = f" (line {ctx.line + 1}, column {ctx.column + 1})" if ctx and ctx is not mark else ""
            what = f"{e.context}{started}: {what}"
        raise YamlProblem(f"YAML syntax error: {what}", where) from None
    except yaml.YAMLError as e:
        raise YamlProblem(f"YAML error: {e}", filename) from None
    except RecursionError:  # the parser itself recurses: deeper than it can go
        raise YamlProblem(f"the YAML is nested more than {MAX_YAML_DEPTH} levels deep", filename) from None


def parse_value(raw: str, where: str) -> Any:
    """A ``--set`` value: YAML when it parses (3, 1e-3, [1, 2], null), else the text as written.
    An alias bomb is a YamlProblem, not text."""
    try:
        return _load(raw, where)[0]
    except (yaml.YAMLError, RecursionError):
        return raw


def _load(text: str, filename: str) -> tuple[Any, dict[tuple, str]]:
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        positions: dict[tuple, str] = {}
        if node is not None:
            _check_expansion(node, filename)
            _index_nodes(node, (), filename, positions)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, positions


def _at(node: yaml.Node, filename: str) -> str:
    return f"{filename}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _check_expansion(root: yaml.Node, filename: str) -> None:
    """Refuse a document whose aliases contain themselves or expand it past MAX_YAML_VALUES, or
    that nests past MAX_YAML_DEPTH. Depth-first with an explicit stack: no recursion."""
    on_path: set[int] = set()  # the nodes being expanded above the current one
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    values = 0
    while stack:
        node, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        if id(node) in on_path:
            raise YamlProblem("an alias refers to a value that contains it (a recursive anchor)", _at(node, filename))
        values += 1
        if values > MAX_YAML_VALUES:
            raise YamlProblem(f"the YAML expands to more than {MAX_YAML_VALUES:,} values once its aliases are "
                              "followed (a config needs a few hundred)", _at(node, filename))
        if depth > MAX_YAML_DEPTH:
            raise YamlProblem(f"the YAML is nested more than {MAX_YAML_DEPTH} levels deep", _at(node, filename))
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            on_path.add(id(node))
            stack.append((node, depth, True))
            children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
            stack.extend((child, depth + 1, False) for child in children)


def _index_nodes(node: yaml.Node, path: tuple, filename: str, out: dict[tuple, str]) -> None:
    """Record where each key (and list item) starts; refuse duplicate keys, which YAML would drop silently."""
    if isinstance(node, yaml.MappingNode):
        items = [(k.value if isinstance(k, yaml.ScalarNode) else str(k), k, v) for k, v in node.value]
    elif isinstance(node, yaml.SequenceNode):
        items = [(i, v, v) for i, v in enumerate(node.value)]
    else:
        return
    for k, at, value in items:
        where = _at(at, filename)
        if path + (k,) in out:
            first = out[path + (k,)].split(":")[-2]
            raise YamlProblem(f"duplicate key (first at line {first})", where, path + (k,))
        out[path + (k,)] = where
        _index_nodes(value, path + (k,), filename, out)


__all__ = ["MAX_YAML_VALUES", "MAX_YAML_DEPTH", "YamlProblem", "Loader", "parse", "parse_value"]

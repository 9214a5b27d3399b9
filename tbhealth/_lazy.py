"""Package attributes imported on first use (PEP 562).

The plugin and the CLI import ``tbhealth.run`` and must not pay for torch or pydantic because a
package ``__init__`` names a class that needs them; each package lists its public names here and
the module that holds each, and the name is imported the first time someone reads it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, table: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``table`` maps each name to its module (absolute,
    or relative to ``package`` when it starts with a dot); a name read once is kept in ``namespace``."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    return __getattr__

"""The ``tbhealth`` command: train from a config, watch and steer runs, open TensorBoard.

Commands are loaded lazily: a command's module is imported, and its click command built from the
function's signature, only when that command is looked up (to run it, or for ``--help``). So
``tbhealth train`` does not import the status tables, the control client or the board launcher,
and ``tbhealth status`` does not build ``train``'s options. An unknown command name loads them all,
for click's "did you mean" suggestions.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from tbhealth_cli import lifecycle

#: command -> (module in tbhealth_cli, function; ``make_command`` is a factory taking the name,
#: whether the bare command prints its help). The order is the one ``tbhealth --help`` lists.
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "train": ("train", "train", True),
    **{name: ("control", "make_command", True) for name in ("pause", "resume", "stop", "checkpoint")},
    "status": ("show", "status", True),
    "alerts": ("show", "alerts", True),
    "runs": ("show", "runs", False),
    "board": ("board", "board", False),
}


def load_command(name: str) -> typer.models.CommandInfo:
    """Import the command's module and describe the command (Typer builds it from the function)."""
    module, attr, no_args_is_help = COMMANDS[name]
    function = getattr(importlib.import_module(f"tbhealth_cli.{module}"), attr)
    if attr == "make_command":
        function = function(name)
    return typer.models.CommandInfo(name=name, callback=function, no_args_is_help=no_args_is_help)


class LazyGroup(TyperGroup):
    """The top-level group: knows every command's name, builds a command when it is asked for."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str):
        if cmd_name not in self.commands:
            for name in [cmd_name] if cmd_name in COMMANDS else [n for n in COMMANDS if n not in self.commands]:
                self.add_command(_build(name), name)
        return self.commands.get(cmd_name)


def _build(name: str):
    single = typer.Typer(add_completion=False, rich_markup_mode=app.rich_markup_mode)
    single.registered_commands.append(load_command(name))
    return typer.main.get_command(single)


app = typer.Typer(
    name="tbhealth",
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="Real-time health monitoring and control for PyTorch training, inside TensorBoard.",
)


@app.callback()
def _root() -> None:
    """Makes ``app`` a group whose commands :class:`LazyGroup` supplies."""


def main() -> None:
    lifecycle.owns_process = True  # the process ends with the command (see lifecycle)
    app()


if __name__ == "__main__":
    main()

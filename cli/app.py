"""The ``tbhealth`` command: train from a config, watch and steer runs, open TensorBoard."""

from __future__ import annotations

import typer

from tbhealth_cli import board, control, lifecycle, show, train

app = typer.Typer(
    name="tbhealth",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="Real-time health monitoring and control for PyTorch training, inside TensorBoard.",
)

app.command("train", no_args_is_help=True)(train.train)
for _name in ("pause", "resume", "stop", "checkpoint"):
    app.command(_name, no_args_is_help=True)(control.make_command(_name))
app.command("status", no_args_is_help=True)(show.status)
app.command("alerts", no_args_is_help=True)(show.alerts)
app.command("runs")(show.runs)
app.command("board")(board.board)


def main() -> None:
    lifecycle.owns_process = True  # the process ends with the command (see lifecycle)
    app()


if __name__ == "__main__":
    main()

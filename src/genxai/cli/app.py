"""The typer application object; command modules attach their commands to it."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

app = typer.Typer(
    name="genxai",
    help="Explainable generative modelling: explain models, train XAI-guided diffusion, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from genxai import __version__

        typer.echo(f"genxai {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Explainable generative modelling: explain models, train XAI-guided diffusion, report."""


def fail(err: Exception) -> typer.Exit:
    """Print one ``error:`` line (no traceback) and give the exit to raise: code 2, bad input."""
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Inside the block, each warning is one ``warning: ...`` line on stderr (no source line)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def end_process_group() -> None:
    """Destroy torch.distributed's default group if one is up (under ``accelerate launch``).

    A process that exits with its gloo group alive can abort in interpreter shutdown (SIGABRT,
    pytorch/pytorch#190489); every command that may run under a launcher calls this on its way out.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

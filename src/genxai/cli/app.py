"""The typer application object; command modules attach their commands to it."""

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

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


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError)
"""Errors a command reports as one ``error:`` line (bad input, missing files), exit code 2."""


def exit_code(summary: dict) -> int:
    """0 when training ended normally; 128 + the signal's number when a signal interrupted it."""
    import signal

    if summary["status"] != "interrupted":
        return 0
    return 128 + int(signal.Signals[summary.get("signal") or "SIGTERM"])


def train_command(make_trainer: Callable[[], Any]) -> None:
    """Build a training loop, fit it and report, the same way for every ``genxai train*`` command.

    Says when it resumes (stderr); prints the summary as one JSON line; a NaN loss exits 1, bad
    input one ``error:`` line and 2, an interrupting signal 128 + its number with how to resume.
    """
    from genxai.training import NonFiniteLossError

    try:
        trainer = make_trainer()
        unit = trainer.step.unit
        if trainer.resumed_from is not None and trainer.is_main:
            typer.echo(f"resuming from {unit} {trainer.units} ({trainer.resumed_from})", err=True)
        summary = trainer.fit()
    except NonFiniteLossError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1) from None
    except USER_ERRORS as err:
        raise fail(err) from None
    finally:
        end_process_group()
    code = exit_code(summary)
    if trainer.is_main:
        typer.echo(json.dumps({"run_dir": str(trainer.run_dir), **summary}))
        if code:
            typer.echo(
                f"interrupted at {unit} {trainer.units} ({summary['signal']}, saved "
                f"{summary['checkpoint']}); rerun the same command to resume",
                err=True,
            )
    if code:
        raise typer.Exit(code=code)

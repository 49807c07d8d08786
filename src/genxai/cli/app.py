"""The typer application object; command modules attach their commands to it."""

import typer

app = typer.Typer(
    name="genxai",
    help="Explainable generative modelling: explain models, train XAI-guided diffusion, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(err: Exception) -> typer.Exit:
    """Print one ``error:`` line (no traceback) and give the exit to raise: code 2, bad input."""
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def end_process_group() -> None:
    """Destroy torch.distributed's default group if one is up (under ``accelerate launch``).

    A process that exits with its gloo group alive can abort in interpreter shutdown (SIGABRT,
    pytorch/pytorch#190489); every command that may run under a launcher calls this on its way out.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

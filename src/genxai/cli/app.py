"""The typer application object; command modules attach their commands to it."""

import typer

app = typer.Typer(
    name="genxai",
    help="Explainable generative modelling: explain models, train XAI-guided diffusion, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

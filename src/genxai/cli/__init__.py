"""The ``genxai`` command line. Nothing in the library imports this package.

Each module registers its commands on :data:`genxai.cli.app.app`:
``explain.py`` (explain, report, demo), ``diffusion.py`` (train, sample, fid, ablate),
``gan.py`` (train-gan, sample-gan), ``dissection.py`` (train-segmenter, dissect) and
``export.py`` (export: a run as a diffusers folder).
"""

from genxai.cli import (  # noqa: F401  (registers the commands)
    diffusion,
    dissection,
    explain,
    explainers_examples,
    explainers_generative,
    export,
    gan,
)
from genxai.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]

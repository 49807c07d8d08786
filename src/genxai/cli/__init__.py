"""The ``genxai`` command line. Nothing in the library imports this package.

Each module registers its commands on :data:`genxai.cli.app.app`:
``explain.py`` (explain, report, demo), ``diffusion.py`` (train, sample, fid, ablate),
``gan.py`` (train-gan, sample-gan) and ``dissection.py`` (train-segmenter, dissect).
"""

from genxai.cli import diffusion, dissection, explain, gan  # noqa: F401  (registers the commands)
from genxai.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]

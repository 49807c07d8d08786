"""The ``genxai`` command line. Nothing in the library imports this package.

Each module registers its commands on :data:`genxai.cli.app.app`:
``explain.py`` (explain, report, demo) and ``diffusion.py`` (train, sample, fid, ablate).
"""

from genxai.cli import diffusion, explain  # noqa: F401  (registers the commands)
from genxai.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]

"""Command-line front end: `stylealigned COMMAND ...`. Each command lives in its own module."""

import sys

import typer

from ..errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Generate sets of images that share one style (StyleAligned, Hertz et al. 2023).",
)

# Each module registers its command on `app` when imported.
from . import generate  # noqa: E402,F401
from . import transfer  # noqa: E402,F401
from . import score  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401
from . import demo  # noqa: E402,F401
from . import ui  # noqa: E402,F401
from .common import Interrupted  # noqa: E402


def main() -> None:
    """Run the CLI; a UserError becomes one line on stderr and exit status 2, with no traceback."""
    try:
        app()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as interruption:
        print(interruption, file=sys.stderr)
        sys.exit(130)

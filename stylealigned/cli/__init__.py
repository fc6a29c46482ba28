"""Command-line front end: `stylealigned COMMAND ...`. Each command lives in its own module."""

import sys

import typer

try:  # typer >= 0.29 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from ..cpu_memory import keep_freed_memory
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
from . import panorama  # noqa: E402,F401
from .common import Interrupted  # noqa: E402


def main() -> None:
    """Run the CLI; a UserError or a bad option becomes one line on stderr and exit status 2, with no traceback."""
    keep_freed_memory()  # CPU steps without page faults (stylealigned/cpu_memory.py)
    try:
        sys.exit(app(standalone_mode=False) or 0)
    except NoArgsIsHelpError as error:
        print(error.ctx.get_help())
        sys.exit(2)
    except UsageError as error:
        command = error.ctx.command_path if error.ctx else "stylealigned"
        print(f"error: {error.format_message()}; see {command} --help".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except ClickException as error:
        print(f"error: {error.format_message()}".replace("\n", " "), file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        sys.exit(1)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as interruption:
        print(interruption, file=sys.stderr)
        sys.exit(130)

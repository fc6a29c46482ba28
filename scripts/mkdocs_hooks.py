"""MkDocs hooks: the command-line reference (docs/cli.md) is every command's own `--help`, captured at build time."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- cli-help -->"
# Run in a fresh interpreter: typer reads TYPER_USE_RICH (plain text, no boxes) when it is first imported.
PRINT_HELP = """
import json
import typer
from typer.testing import CliRunner
from stylealigned.cli import app
names = ["", *typer.main.get_command(app).commands]
print(json.dumps({name: CliRunner().invoke(app, [name, "--help"] if name else ["--help"], prog_name="stylealigned")
                  .output for name in names}))
"""


def command_help() -> dict[str, str]:
    """{command name ("" for `stylealigned` itself): its --help text}, as the CLI of this checkout prints it."""
    env = {**os.environ, "TYPER_USE_RICH": "0", "COLUMNS": "100",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", PRINT_HELP], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"the CLI's --help could not be printed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cli_reference() -> str:
    sections = []
    for name, text in command_help().items():
        sections += [f"## stylealigned {name}".rstrip(), "", "```text", text.rstrip(), "```", ""]
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown

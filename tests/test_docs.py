"""The docs cannot drift from the code: the README stays short, the site builds with `mkdocs build --strict`, and
every code block of the README and the guides is run here, or, marked `<!-- not run: REASON -->` on the line
before it (a hub model, a GPU, hours), at least checked: Python parsed and its stylealigned names and call
arguments resolved, shell commands parsed by the CLI's own parser (scripts: their files and flags)."""

import ast
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from stylealigned.cli import app, main

ROOT = Path(__file__).resolve().parent.parent
# performance.md and findings.md are reports kept as their commands wrote them; cli.md and api.md are generated
PAGES = [ROOT / "README.md"] + sorted(path for path in (ROOT / "docs").glob("*.md")
                                      if path.name not in ("performance.md", "findings.md"))
NOT_RUN = re.compile(r"^<!-- not run: (\S.*) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")
CLI = typer.main.get_command(app)
EXTERNAL = {"pip", "hf", "mkdocs", ".", "source", "export"}  # other tools' commands, named in the docs as they are


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    not_run: str | None  # the reason, for a block that is only checked

    def __str__(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, with the `not run` marker of the line before each."""
    found, lines = [], page.read_text(encoding="utf-8").splitlines()
    start = None
    for number, line in enumerate(lines):
        fence = FENCE.match(line)
        if fence and start is None:
            start, language = number, fence.group(1)
        elif line.startswith("```") and start is not None:
            marker = NOT_RUN.match(lines[start - 1]) if start else None
            found.append(Block(page, start + 1, language, "\n".join(lines[start + 1:number]) + "\n",
                               marker and marker.group(1)))
            start = None
    assert start is None, f"{page}:{start + 1}: a code block is never closed"
    return found


ALL = [block for page in PAGES for block in blocks(page)]
CODE = [block for block in ALL if block.language != "text"]


def commands(script: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at && and ;."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        words, command = shlex.split(line, comments=True), []
        for word in words + ["&&"]:
            if word in ("&&", ";"):
                found += [command] if command else []
                command = []
            else:
                command.append(word)
    return found


def check_cli(args: list[str]) -> None:
    """Parse `stylealigned ARGS` with the CLI's own parser: the command, every option and every value's type."""
    name, *rest = args
    assert name in CLI.commands, f"no command `stylealigned {name}`"
    parent = CLI.make_context("stylealigned", [name], resilient_parsing=True)
    try:
        CLI.commands[name].make_context(name, rest, parent=parent)
    except Exception as error:  # click's errors: an unknown option, a bad value, a missing argument
        raise AssertionError(f"`stylealigned {shlex.join(args)}`: {error}") from None


def check_command(words: list[str]) -> None:
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before a command
        words = words[1:]
    if not words:
        return
    program, *args = words
    if program == "stylealigned":
        return check_cli(args)
    if program == "accelerate" or program == "python" and args[:2] == ["-m", "stylealigned.cli"]:
        assert "stylealigned.cli" in args, f"unexpected command: {shlex.join(words)}"
        return check_cli(args[args.index("stylealigned.cli") + 1:])
    if program == "python" and args[:2] == ["-m", "pytest"]:
        for path in (arg.split("::")[0] for arg in args[2:] if not arg.startswith("-") and not arg.isdigit()):
            assert (ROOT / path).exists(), f"no such test path: {path}"
        return None
    if program in ("python", "bash"):
        assert (ROOT / args[0]).is_file(), f"no such script: {args[0]}"
        if program == "python":
            help_text = script_help(args[0], args[1:])
            for flag in (arg.split("=")[0] for arg in args[1:] if arg.startswith("--")):
                assert flag in help_text, f"{args[0]} has no option {flag}"
        return None
    assert program in EXTERNAL, f"unknown program {program!r} in: {shlex.join(words)}"


SCRIPT_HELP: dict[tuple[str, frozenset], str] = {}


def script_help(script: str, args: list[str]) -> str:
    """The script's own parser reads `args`, then prints its help and stops. Once per script and set of flags: a
    script costs seconds to import, so commands that differ only in their values are read once."""
    key = (script, frozenset(arg.split("=")[0] for arg in args if arg.startswith("--")))
    if key not in SCRIPT_HELP:
        result = subprocess.run([sys.executable, script, *args, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        SCRIPT_HELP[key] = result.stdout
    return SCRIPT_HELP[key]


def check_python(code: str) -> None:
    """Every stylealigned module, name and attribute the block uses exists, and calls bind to their signatures."""
    tree = ast.parse(code)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stylealigned":
                    aliases[alias.asname or alias.name] = importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stylealigned":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                aliases[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (target := resolve(node.func, aliases)) is not None and callable(target):
            if any(isinstance(arg, ast.Starred) for arg in node.args) or any(k.arg is None for k in node.keywords):
                continue
            try:
                inspect.signature(target).bind(*node.args, **{k.arg: k.value for k in node.keywords})
            except TypeError as error:
                raise AssertionError(f"{ast.unparse(node.func)}: {error}") from None
        elif isinstance(node, ast.Attribute):
            resolve(node, aliases)


def resolve(node: ast.expr, aliases: dict):
    """The object a dotted name from stylealigned stands for (None if it does not start at an alias)."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = resolve(node.value, aliases)
        if owner is None:
            return None
        assert hasattr(owner, node.attr), f"{getattr(owner, '__name__', owner)} has no attribute {node.attr}"
        return getattr(owner, node.attr)
    return None


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_readme_keeps_quickstart_and_families_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = next(block for block in blocks(ROOT / "README.md") if "scripts/setup.sh" in block.code)
    assert [command[:2] for command in commands(quickstart.code)] == [
        ["bash", "scripts/setup.sh"], [".", ".venv/bin/activate"], ["stylealigned", "demo"], ["python", "-m"]]
    assert "python -m pytest -n 2" in quickstart.code
    assert "| family | pipelines | shared layers by default | why |" in readme


def test_code_blocks_are_python_or_shell():
    assert {block.language for block in CODE} <= {"python", "bash"}, [str(b) for b in CODE if not b.language]


@pytest.mark.parametrize("block", CODE, ids=str)
def test_code_block_is_valid(block):
    if block.language == "python":
        check_python(block.code)
    else:
        assert commands(block.code), "an empty shell block"
        for command in commands(block.code):
            check_command(command)


def run_shell(block: Block) -> None:
    """Run each `stylealigned` command of a block in this process, as the shell would run the installed script."""
    for command in commands(block.code):
        assert command[0] == "stylealigned", f"{block}: only stylealigned commands run here; mark the block not run"
        argv = sys.argv
        sys.argv = command
        try:
            with pytest.raises(SystemExit) as exit:
                main()
        finally:
            sys.argv = argv
        assert exit.value.code == 0, f"{block}: `{shlex.join(command)}` exited with {exit.value.code}"


RUN = sorted({block.page for block in CODE if block.not_run is None})


@pytest.mark.parametrize("page", RUN, ids=lambda page: page.name)
def test_page_code_runs_offline(page, tmp_path, monkeypatch):
    """The page's blocks in order, Python ones in one namespace, in a fresh folder beside examples/."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    namespace = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.not_run is not None or block.language == "text":
            continue
        if block.language == "python":
            exec(compile(block.code, str(block), "exec"), namespace)
        else:
            run_shell(block)


def test_site_builds_strict(tmp_path):
    """A broken link, a missing page or a docstring that does not fit its signature fails the build."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    assert all(f"stylealigned {name} [OPTIONS]" in cli_page for name in CLI.commands)
    assert "generate_set" in (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert (tmp_path / "site" / "search" / "search_index.json").is_file()  # search, built offline


@pytest.mark.parametrize("command", [
    "stylealigned generate a --no-such-flag", "stylealigned generat a", "stylealigned generate a --steps many",
    "python benchmarks/no-such.py", "python -m pytest tests/test_nothing.py",
    "curl https://example.com"])
def test_a_drifted_command_is_caught(command):
    with pytest.raises(AssertionError):
        check_command(shlex.split(command))


@pytest.mark.parametrize("code", [
    "import stylealigned as sa\nsa.generate_sets(pipe, prompts)", "from stylealigned.control import depth_map",
    "import stylealigned as sa\nsa.generate_panorama(pipe, 'a', views=4)", "import stylealigned as sa\nsa.invert()",
    "import stylealigned as sa\nsa.StyleAlignedConfig.transfers()"])
def test_drifted_python_is_caught(code):
    with pytest.raises((AssertionError, ImportError)):
        check_python(code)
